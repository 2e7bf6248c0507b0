"""A finished run as a shareable adapter: ``RUN/adapter/``, with a model card.

Layout (every file written atomically, then listed with its SHA-256 in ``manifest.json``)::

    adapter/
      adapter_config.json     the method's adapter, in mmtune's adapter format
      adapter.safetensors     (methods/base.py); for MiT, MiTModel.from_pretrained(llm, adapter/)
      peft/                   LoRA / IA3 runs: the LLM's adapters in PEFT's own format, so
                              peft.PeftModel.from_pretrained(llm, adapter/peft) loads them
      task.safetensors        every other trained tensor: the task head, the sequence
                              encoders, the concat projector, the task token (TaskModel names)
      mmtune_run.json         the run's TrainConfig, the data-derived spec, the frozen parts' ids
      README.md               the model card (Hub front matter: library_name, base_model, tags)
      manifest.json

The frozen LLM and vision encoder are not copied: ``mmtune_run.json["frozen"]`` names them, and
loading rebuilds them from those names (an embedded name, a directory or a hub id).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtune._version import __version__
from mmtune.methods.concat import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, load_peft_format
from mmtune.methods.concat import save_peft_format as _save_peft
from mmtune.methods.mit import MiTModel
from mmtune.methods.registry import get_method, split_legacy_method
from mmtune.models.llm import EMBEDDED_LLMS
from mmtune.tasks import get_task
from mmtune.utils.adapter_file import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    load_adapter_tensors,
    read_adapter,
    write_adapter,
)
from mmtune.utils.io import (
    atomic_write,
    copy_tensors_into,
    load_tensors,
    read_json,
    save_tensors,
    verify_manifest,
    write_json,
    write_manifest,
)

__all__ = [
    "ADAPTER_DIR",
    "RUN_ADAPTER_FORMAT",
    "find_run_adapter",
    "front_matter",
    "hub_id",
    "load_run_adapter_weights",
    "model_card",
    "write_run_adapter",
]

ADAPTER_DIR = "adapter"
RUN_FILE = "mmtune_run.json"
TASK_WEIGHTS = "task.safetensors"
CARD = "README.md"
RUN_ADAPTER_FORMAT = "mmtune-run-adapter/1"
_LLM_PREFIXES = ("llm.", "decoder_backbone.")  # the two names TaskModel has for the LLM


def _method_and_peft(config: dict[str, Any]) -> tuple[str, str]:
    """A run config's (method, peft), reading the spelling of mmtune < 0.4 too."""
    peft = config.get("peft")
    peft = peft if isinstance(peft, str) else "none"  # a mapping: options of mmtune < 0.4
    return split_legacy_method(config["method"], peft, "run config", warn=False)


def _peft_kind(config: dict[str, Any]) -> str | None:
    """The run's PEFT adapter (lora, ia3) or None."""
    kind = _method_and_peft(config)[1]
    return None if kind == "none" else kind


def method_label(config: dict[str, Any]) -> str:
    """``concat+lora`` for a run's method with its PEFT adapter, else the method's name."""
    method, kind = _method_and_peft(config)
    return f"{method}+{kind}" if kind != "none" else method


def hub_id(llm: str) -> str:
    """The hub id a model card names for ``llm`` (an embedded name's source model)."""
    embedded = EMBEDDED_LLMS.get(llm)
    return embedded.source if embedded is not None and embedded.source else llm


def _task_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous()
        for n, p in module.named_parameters()
        if p.requires_grad and not n.startswith(_LLM_PREFIXES)
    }


def write_run_adapter(
    directory: Path,
    module: Any,
    config: dict[str, Any],
    spec: dict[str, Any],
    results: dict[str, Any],
) -> Path:
    """Write ``directory`` (normally ``RUN/adapter``) from a trained task model.

    ``config`` is the run's TrainConfig as a dict, ``spec`` what the data decided (the
    ``final/spec.json`` content) and ``results`` the run's results.json (for the card)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    method = config["method"]
    files = [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, TASK_WEIGHTS, RUN_FILE, CARD]
    if isinstance(module.llm, MiTModel):
        module.llm.save_pretrained(directory)
    else:  # no tensors inside the LLM of mmtune's own, and the method's options for the record
        write_adapter(
            directory,
            method=method,
            tensors={},
            config={k: config[k] for k in ("concat", "peft", "peft_config") if k in config},
            base_model=module.llm,
        )
    if _peft_kind(config):
        _save_peft(module.llm, directory / "peft", hub_id(config["model"]["llm"]))
        files += [f"peft/{PEFT_CONFIG_NAME}", f"peft/{PEFT_WEIGHTS_NAME}"]
    save_tensors(directory / TASK_WEIGHTS, _task_tensors(module), metadata={"format": "pt"})
    frozen = {
        "llm": config["model"]["llm"],
        "llm_hub_id": hub_id(config["model"]["llm"]),
        "vision": config["model"]["vision"] if "preprocess" in spec else None,
        "dtype": config["model"]["dtype"],
    }
    write_json(
        directory / RUN_FILE,
        {
            "format": RUN_ADAPTER_FORMAT,
            "mmtune_version": __version__,
            "method": method,
            "frozen": frozen,
            "config": config,
            "spec": spec,
        },
    )
    with atomic_write(directory / CARD) as tmp:
        tmp.write_text(model_card(config, spec, results, frozen))
    write_manifest(directory, files, format=RUN_ADAPTER_FORMAT, mmtune_version=__version__)
    return directory


def find_run_adapter(path: str | Path) -> Path | None:
    """The run adapter at ``path`` (an adapter directory, or a run holding ``adapter/``), after
    checking its manifest; None when ``path`` holds none (a run saved by mmtune < 0.3)."""
    path = Path(path)
    for candidate in (path, path / ADAPTER_DIR):
        if (candidate / RUN_FILE).is_file():
            verify_manifest(candidate, "run adapter")
            return candidate
    return None


def read_run_file(directory: Path) -> dict[str, Any]:
    """``mmtune_run.json`` of a run adapter; its fields are checked."""
    path = Path(directory) / RUN_FILE
    meta = read_json(path, "run adapter")
    if not isinstance(meta, dict) or meta.get("format") != RUN_ADAPTER_FORMAT:
        raise ValueError(f"{path}: field 'format' must be {RUN_ADAPTER_FORMAT!r}")
    for field in ("config", "spec", "frozen", "method"):
        if field not in meta:
            raise ValueError(f"{path}: missing field {field!r}")
    return meta


def load_run_adapter_weights(module: Any, directory: Path) -> None:
    """Copy a run adapter's tensors into a task model built from its config (make_model).

    Each part is strict: a missing, unexpected or misshapen tensor is one error naming the
    file; together the parts cover every trainable tensor of ``module``."""
    directory = Path(directory)
    run_file = read_run_file(directory)
    method = run_file["method"]
    covered: set[str] = set()
    if isinstance(module.llm, MiTModel):
        _, tensors = read_adapter(directory, method="mit")
        load_adapter_tensors(
            module.llm, tensors, source=str(directory / ADAPTER_WEIGHTS_NAME), prefix="infusion."
        )
        covered |= {f"llm.{k}" for k in tensors}
    else:
        read_adapter(directory, method=method)  # checks its digests; it holds no tensors
    if _peft_kind({"method": method, **run_file.get("config", {})}):
        load_peft_format(module.llm, directory / "peft")
        covered |= {
            n for n, p in module.named_parameters() if p.requires_grad and n.startswith("llm.")
        }
    path = directory / TASK_WEIGHTS
    weights = load_tensors(path, "task weights")
    own = {n: p for n, p in module.named_parameters() if p.requires_grad}
    task_own = {n: p for n, p in own.items() if not n.startswith(_LLM_PREFIXES)}
    copy_tensors_into(task_own, weights, path)
    covered |= set(weights)
    left = sorted(set(own) - covered)
    if left:
        raise ValueError(f"{directory}: holds no values for trainable tensors {left[:5]}")


# ----------------------------------------------------------------------------- the model card


def front_matter(fields: dict[str, Any]) -> str:
    """A model card's YAML front matter (the Hub's style) from scalars and lists of scalars."""
    lines = ["---"]
    for key, value in fields.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join([*lines, "---", ""])


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def model_card(
    config: dict[str, Any], spec: dict[str, Any], results: dict[str, Any], frozen: dict[str, Any]
) -> str:
    """The README.md of a run adapter: Hub front matter, then the method, the data, the test
    metrics with their conventions, the reliance on the modality, and how to load it."""
    task, method = spec["task"], method_label(config)
    data = results.get("data", {})
    dataset = str(data.get("data", config["task"]["data"]))
    head = {
        "library_name": "mmtune",
        "base_model": frozen["llm_hub_id"],
        "tags": ["mmtune", method.replace("+", "-"), "multimodal", *get_task(task).hub_tags],
        "datasets": [dataset],
        "pipeline_tag": get_task(task).pipeline_tag,
    }
    if frozen.get("vision"):
        head["tags"].append(f"vision-encoder:{frozen['vision']}")
    peft = _peft_kind(config)
    about = get_method(method.split("+")[0]).summary + (
        f" Here with {peft.upper() if peft == 'ia3' else 'LoRA'} adapters in the frozen LLM (PEFT)."
        if peft
        else ""
    )
    metrics = results.get("metrics", {})
    conventions = results.get("conventions", {})
    rel = results.get("reliance") or {}
    params = results.get("parameters", {})
    split = results.get("test_split", config["task"].get("test_split", "test"))
    lines = [
        front_matter(head),
        f"# {method} on {dataset}: {task} with a frozen {frozen['llm']}",
        "",
        f"Trained with [mmtune](https://pypi.org/project/mmtune/) {__version__}.",
        "",
        f"- **Method:** {about}",
        f"- **Frozen LLM:** `{frozen['llm']}` (hub id `{frozen['llm_hub_id']}`, "
        f"{frozen['dtype']}); not included here.",
    ]
    if frozen.get("vision"):
        lines.append(
            f"- **Frozen vision encoder:** `{frozen['vision']}`, preprocessing "
            f"`{json.dumps(spec.get('preprocess'))}`; not included here."
        )
    lines += [
        f"- **Modality scaling:** `task.modality_norm: {config['task'].get('modality_norm')}`.",
        f"- **Data:** `{dataset}`, splits {json.dumps(data.get('splits', {}))}.",
        f"- **Trained tensors:** {params.get('trainable', 0):,} of {params.get('total', 0):,} "
        f"({100 * params.get('share', 0.0):.3f}%); epochs {config['optim']['epochs']}, lr "
        f"{config['optim']['lr']}, batch {config['optim']['batch_size']}, seed {config['seed']}.",
        "",
        f"## Metrics on the {split} split",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in metrics.items()],
        "",
    ]
    if rel:
        lines += [
            "Reliance on the modality: the headline metric with each sample's modality replaced "
            "by another sample's (a fixed seeded derangement):",
            "",
            "```json",
            json.dumps({k: v for k, v in rel.items() if k != "conventions"}, indent=1),
            "```",
            "",
        ]
    if conventions:
        lines += ["Conventions:", ""]
        lines += [f"- `{k}`: {v}" for k, v in conventions.items()]
        lines.append("")
    lines += [
        "## How to load",
        "",
        "```bash",
        "mmtune eval path/to/adapter --split test",
        "mmtune predict path/to/adapter 'the text of the sample'"
        + (" --image picture.jpg" if frozen.get("vision") else ""),
        "```",
        "",
        "```python",
        "from mmtune.recipes.evaluate import load_run",
        "config, spec, model = load_run('path/to/adapter')   # the whole task model",
        "```",
    ]
    if get_method(method.split("+")[0]).reads == "vector":  # MiT: the infusion alone
        lines += [
            "",
            "The infusion alone, on a base model you load yourself:",
            "",
            "```python",
            "from mmtune import MiTModel, load_llm",
            f"llm, tokenizer = load_llm({frozen['llm']!r})",
            "model = MiTModel.from_pretrained(llm, 'path/to/adapter')",
            "out = model(**tokenizer('a prompt', return_tensors='pt'), modality=I)  # I: (1, "
            f"{spec.get('d_modality')})",
            "```",
            "",
            f"`I` is the frozen encoder's pooled vector, scaled as `modality_norm` says "
            f"(`{config['task'].get('modality_norm')}`).",
        ]
    if _peft_kind(config):
        lines += [
            "",
            "The LLM's adapters alone, with PEFT:",
            "",
            "```python",
            "from peft import PeftModel",
            "model = PeftModel.from_pretrained(llm, 'path/to/adapter/peft')",
            "```",
        ]
    return "\n".join(lines) + "\n"
