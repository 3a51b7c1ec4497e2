"""Maps computed: model loading, the CDAM engine (closed form, tangents, autograd path), targets and concepts."""
