"""WebDataset shards: safe decoding, tar reading, verification, building and labelled loading."""
from .decode import IMAGE_EXTS, REASONS, Damaged, decode_batch, decode_image, decode_sample, open_image, pick_image
from .tario import ShardReadError, expand_shards, iter_samples, shard_name, sidecar_path

__all__ = [
    "IMAGE_EXTS", "REASONS", "Damaged", "decode_batch", "decode_image", "decode_sample", "open_image", "pick_image",
    "ShardReadError", "expand_shards", "iter_samples", "shard_name", "sidecar_path",
    "verify_shards", "print_report", "build_from_folder", "build_from_arrays", "ShardWriter",
    "load_labelled", "iter_labelled_batches", "read_class_names",
]


def __getattr__(name):  # lazy: keep `import odsd_dist.shards` light inside Ray workers
    if name in ("verify_shards", "print_report"):
        from . import verify
        return getattr(verify, name)
    if name == "ShardWriter":
        from . import writer
        return writer.ShardWriter
    if name in ("build_from_folder", "build_from_arrays"):
        from . import build
        return getattr(build, name)
    if name in ("load_labelled", "iter_labelled_batches", "read_class_names"):
        from . import labelled
        return getattr(labelled, name)
    raise AttributeError(name)
