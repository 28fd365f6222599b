"""Random-weight TabPFN-3.5 and TabPFN-3 checkpoints in the format tabpfn 9.2's loader reads.

TabPFN's real weights come from gated Hugging Face repositories, which the tests cannot reach; these files
stand in for them (``TabPFNClassifier(model_path=...)``, or under TabPFN's default file name in
``TABPFN_MODEL_CACHE_DIR``). The format, from ``tabpfn.model_loading`` (``_build_model``,
``save_tabpfn_model``) and ``tabpfn.checkpoint``:

- a dict ``{"state_dict": model.state_dict(), "config": dataclasses.asdict(config), "architecture_name": name}``,
  written with ``torch.save`` (a ``.ckpt`` file) or as safetensors with the non-tensor fields JSON-encoded in the
  header (``tabpfn.checkpoint.save_as_safetensors``; TabPFN-3.5's real files are ``.safetensors``);
- ``architecture_name`` picks the module in ``tabpfn.architectures.ARCHITECTURES``: ``"tabpfn_v3_5"``
  (``TabPFNV3p5Config``) or ``"tabpfn_v3"`` (``TabPFNV3Config``); ``config`` goes through that module's
  ``parse_config``;
- TabPFN-3.5 carries both heads in one file (``max_num_classes`` and ``num_buckets`` both set); a TabPFN-3 file
  is a classifier when ``max_num_classes >= 2``, otherwise a regressor (``num_buckets`` set); the regression
  borders are the model's ``regression_borders`` buffer, saved in the state dict;
- no ``"inference_config"``: the loader then uses its default for the task (``InferenceConfig.get_default(...,
  V2_5)``, 8 estimators); the real files carry their own, which is not public;
- the file's *name* gives the model version (``tabpfn.model_loading.resolve_model_version``: "v3.5" or "v3" in
  it), which sets TabPFN's CPU sample limit (5,000 rows for both) and nothing in the model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from tabpfn.architectures import tabpfn_v3, tabpfn_v3_5
from tabpfn.checkpoint import save_as_safetensors
from tabpfn.constants import ModelVersion
from tabpfn.model_loading import resolve_model_version

#: The models: architecture module, config class and the loader's ``architecture_name``.
KINDS = {"v3.5": (tabpfn_v3_5, tabpfn_v3_5.TabPFNV3p5Config, "tabpfn_v3_5"),
         "v3": (tabpfn_v3, tabpfn_v3.TabPFNV3Config, "tabpfn_v3")}
TASKS = ("classifier", "regressor")
#: Small models for the 2-core tests: 3 ICL layers of 8 heads (of 32 in TabPFN-3.5, 16 in TabPFN-3: embed_dim ×
#: CLS tokens / heads), grouped KV heads (4 for training rows, 1 for test rows), one block in each embedding stage.
SMALL = {"v3.5": {"embed_dim": 32, "nlayers": 3, "icl_num_heads": 8, "icl_num_kv_heads": 4,
                  "icl_num_kv_heads_test": 1, "dist_embed_num_blocks": 1, "dist_embed_num_heads": 4,
                  "dist_embed_num_inducing_points": 16, "feat_agg_num_blocks": 1, "feat_agg_num_heads": 4,
                  "decoder_num_heads": 2, "decoder_head_dim": 32},
         "v3": {"embed_dim": 32, "nlayers": 3, "icl_num_heads": 8, "icl_num_kv_heads": 4,
                "icl_num_kv_heads_test": 1, "dist_embed_num_blocks": 1, "feat_agg_num_blocks": 1,
                "decoder_num_heads": 2, "decoder_head_dim": 32}}
MAX_NUM_CLASSES, NUM_BUCKETS = 10, 64


def heads(kind: str, task: str | None) -> dict[str, int]:
    """The head sizes of a ``kind`` model for ``task``: TabPFN-3.5 has both heads (``task`` must be None),
    TabPFN-3 one (``task`` "classifier" or "regressor"). Raises ValueError naming the argument otherwise."""
    if kind not in KINDS:
        msg = f"kind must be one of {tuple(KINDS)}, got {kind!r}"
        raise ValueError(msg)
    if kind == "v3.5":
        if task is not None:
            msg = f"task must be None for kind 'v3.5' (one file carries both heads), got {task!r}"
            raise ValueError(msg)
        return {"max_num_classes": MAX_NUM_CLASSES, "num_buckets": NUM_BUCKETS}
    if task not in TASKS:
        msg = f"task must be one of {TASKS} for kind {kind!r}, got {task!r}"
        raise ValueError(msg)
    return {"max_num_classes": MAX_NUM_CLASSES} if task == "classifier" else {"num_buckets": NUM_BUCKETS}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Draw every parameter of ``model`` with std 2 / sqrt(fan-in) (the last dimension), from generator seed
    ``seed + 1`` (as ``conftest.random_model``); buffers keep their values. Returns ``model``."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / max(1, p.shape[-1]) ** 0.5))
    return model


def random_model(kind: str = "v3.5", task: str | None = None, *, seed: int = 0,
                 config: dict[str, Any] | None = None) -> tuple[torch.nn.Module, Any]:
    """A ``kind`` model ("v3.5" or "v3") with random weights and its config: ``SMALL[kind]`` and the task's heads
    (see ``heads``) unless ``config`` gives fields (``{}``: the architecture's full default size)."""
    head_sizes = heads(kind, task)  # checks kind and task
    module, config_class, _ = KINDS[kind]
    cfg = config_class(**{**(SMALL[kind] if config is None else config), **head_sizes})
    torch.manual_seed(seed)
    return randomize(module.get_architecture(cfg).eval(), seed), cfg


def write_checkpoint(path: str | Path, kind: str = "v3.5", task: str | None = None, *, seed: int = 0,
                     config: dict[str, Any] | None = None) -> Path:
    """Write a random-weight ``kind`` model (``random_model``'s arguments) to ``path`` in the loader's format:
    ``torch.save`` for a ``.ckpt`` file, safetensors for ``.safetensors``. The file name must name the version
    as TabPFN reads it ("v3.5" or "v3", e.g. ``tabpfn-v3.5-random.ckpt``). Returns the path; raises ValueError
    for another suffix or a name giving another version."""
    path = Path(path)
    heads(kind, task)  # checks kind and task
    if path.suffix not in (".ckpt", ".safetensors"):
        msg = f"path must end in .ckpt or .safetensors, got {path.name!r}"
        raise ValueError(msg)
    named = resolve_model_version(path)
    if named != ModelVersion(kind):
        msg = (f"path must name version {kind!r} (TabPFN reads the version from the file name), "
               f"got {path.name!r} ({named.value!r})")
        raise ValueError(msg)
    model, cfg = random_model(kind, task, seed=seed, config=config)
    checkpoint = {"state_dict": model.state_dict(), "config": dataclasses.asdict(cfg),
                  "architecture_name": KINDS[kind][2]}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_as_safetensors(checkpoint, path)
    else:
        torch.save(checkpoint, path)
    return path


def checkpoint_name(kind: str, task: str | None = None, suffix: str = ".ckpt") -> str:
    """A file name TabPFN reads as version ``kind``: ``tabpfn-v3.5-random.ckpt``,
    ``tabpfn-v3-classifier-random.ckpt``."""
    return f"tabpfn-{kind}-{task + '-' if task else ''}random{suffix}"
