"""Importers: turn other descriptions of an MoE layer into moec spec data (plain dicts)."""

from moec.importers.hf import (
    SUPPORTED_MODEL_TYPES,
    dump_spec_yaml,
    import_hf_config,
    training_only_notes,
)

__all__ = ["SUPPORTED_MODEL_TYPES", "dump_spec_yaml", "import_hf_config", "training_only_notes"]
