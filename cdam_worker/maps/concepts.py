"""Concept targets as given on the command line: ``NAME=FILE`` (a saved vector) or ``NAME=FOLDER`` (example
images, whose mean embedding is the concept), optionally ending in ``:cosine``.

Used by ``cdam explain --concepts`` and ``cdam derive --concepts``. A vector file needs no model; a folder
needs the model only to embed its examples, so the model is asked for (``embedder``) only then.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from cdam_worker.maps.targets import Concept
from cdam_worker.shards.samples import IMAGE_EXTENSIONS, ImageError, decode_image
from cdam_worker.maps.text_concepts import TextError, concept_prompts, is_text_source, text_tower_of

if TYPE_CHECKING:
    from cdam_worker.maps.engine import CDAMExplainer

CONCEPT_BATCH = 32  # example images embedded per forward pass when building a concept from a folder

Embedder = Callable[[], "tuple[CDAMExplainer, Callable]"]
"""Returns (explainer, eval transform) of the model that embeds example images; called only for folders."""


class ConceptError(ValueError):
    """A ``--concepts`` argument that cannot be turned into a concept (one line naming it)."""


def load_concept(text: str, embed_dim: int, embedder: Embedder) -> Concept:
    """The concept of a ``NAME=FILE|FOLDER[:cosine]`` argument; ConceptError (one line) when it cannot be had."""
    name, sep, source = text.partition("=")
    similarity = "dot"
    if source.endswith(":cosine"):
        source, similarity = source[: -len(":cosine")], "cosine"
    if not sep or not name or not source:
        raise ConceptError(
            f"--concepts {text!r}: expected NAME=FILE, NAME=FOLDER, NAME=text:PROMPT or NAME=prompts:FILE (optionally ending in :cosine)"
        )
    if is_text_source(source):  # CLIP-style models: the text tower's embedding of the prompts
        explainer, _transform = embedder()
        try:
            return Concept(
                name,
                text_tower_of(explainer.model, f"--concepts {name}").direction(concept_prompts(name, source)),
                similarity,
            )
        except TextError as error:
            raise ConceptError(str(error)) from None
    path = Path(source)
    if path.is_dir():
        return _concept_from_folder(name, path, similarity, embedder)
    if not path.is_file():
        raise ConceptError(f"--concepts {name}: {path} is neither a concept file nor a folder of images")
    try:
        concept = Concept.load(path, name)
    except Exception as error:  # noqa: BLE001 - any unreadable concept file is the argument's fault
        raise ConceptError(f"--concepts {name}: cannot read {path}: {str(error).splitlines()[0]}") from None
    if concept.vector.numel() != embed_dim:
        raise ConceptError(
            f"--concepts {name}: vector has {concept.vector.numel()} dims, the model's embedding has {embed_dim}"
        )
    return Concept(name, concept.vector, "cosine" if similarity == "cosine" else concept.similarity)


def _concept_from_folder(name: str, folder: Path, similarity: str, embedder: Embedder) -> Concept:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not files:
        raise ConceptError(f"--concepts {name}: folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    explainer, transform = embedder()
    batches = (
        torch.stack([transform(decode_image(f.read_bytes(), str(f))) for f in files[start : start + CONCEPT_BATCH]])
        for start in range(0, len(files), CONCEPT_BATCH)
    )
    try:
        return explainer.concept_from_images(name, batches, similarity)
    except ImageError as error:
        raise ConceptError(f"--concepts {name}: {error}") from None
