"""Ray driver entry points: ``cdam explain`` (jobs.explain), ``cdam demo`` (jobs.demo), ``cdam verify`` (jobs.verify)."""
