"""The mechanisms that moved below the callbacks (docs/architecture.md, section 1) keep their older import paths
for user code: the callbacks' modules re-export the very same objects (vdiff itself imports the new homes)."""

from __future__ import annotations

from vdiff.callbacks import checkpoint_eval, ema, exported_module, lora, sample_videos, video_quality
from vdiff.lit import adapters, checkpointing, frame_marks, module_loading, quality_metrics, scaling
from vdiff.lit import exported_module as export_entries
from vdiff.weights import peft_files


def test_older_import_paths_name_the_moved_objects():
    moved = {
        checkpoint_eval: (module_loading, ("load_module", "checkpoint_entries", "checkpoint_module_class")),
        ema: (checkpointing, ("EMA_KEY", "load_ema_weights")),
        lora: (adapters, ("LORA_KEY", "LoRAAdapter", "inject_adapters", "merge_adapters", "unload_adapters",
                          "save_adapter", "load_adapter", "adapters_reapplied", "VDT_TEMPORAL_ATTENTION")),
        exported_module: (export_entries, ("ENTRIES_KEY", "module_entries", "is_export", "export_entries")),
        sample_videos: (frame_marks, ("mark_frames", "GIVEN_COLOUR", "GENERATED_COLOUR")),
        video_quality: (quality_metrics, ("build_fvd", "build_fid", "select_frames", "format_quality_report")),
    }  # fmt: skip
    for old, (new, names) in moved.items():
        for name in names:
            assert getattr(old, name) is getattr(new, name), f"{old.__name__}.{name}"
    for name in ("ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "write_adapter_folders", "read_adapter_weights"):
        assert getattr(lora, name) is getattr(peft_files, name), name
    assert ema.is_dtensor is scaling.is_dtensor and ema.reshard_fsdp is scaling.reshard_fsdp
    assert exported_module.load_exported_module is module_loading.load_exported_module
