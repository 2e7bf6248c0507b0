"""Run the reliability issue's hostile inputs against one source tree; print a table.

    python benchmarks/reliability_cases.py --src src --label after \
        --out benchmarks/results/reliability-after.json

``--src`` may point at another checkout's ``src`` (e.g. the commit before the fixes, made with
``git worktree add``) to measure the "before" column with the same cases. Each case runs the
CLI (or a few lines of Python) in a subprocess on tiny random models built here, and records
the exit code, the last line of stderr, whether a traceback was printed and, for the code
execution cases, whether the payload's marker file appeared.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PY_LOAD_ADAPTER = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from mmtune import MiTModel
m = MiTModel.from_pretrained(tiny_model("llama"), {path!r})
x = torch.randint(0, 97, (1, 5))
logits = m(input_ids=x, modality=torch.randn(1, 12)).logits
print("logits finite:", bool(torch.isfinite(logits).all()))
"""

PY_SAVE_ADAPTER = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from mmtune import MiTConfig, inject_mit
cfg = MiTConfig(d_modality=12, layers=[2], form="residual")
inject_mit(tiny_model("llama"), cfg).save_pretrained({path!r})
"""

PY_TRUNCATION = """
from mmtune.recipes.train import TrainConfig, ModelConfig
from mmtune.training.build import build
from mmtune.tasks.model import TaskConfig
from mmtune import MiTConfig
cfg = TrainConfig(task=TaskConfig(data="digits-ve", data_options={{"num_samples": 40}}),
                  model=ModelConfig(llm={llm!r}, vision={vit!r}), mit=MiTConfig(layers=[3, 4]),
                  feature_cache=False)
model, _, _, _ = build(cfg)
filler = " ".join(["word"] * 10000)
a = model.tokenize(model.prompts({{"text": ["The digit is even. " + filler]}}))["input_ids"]
b = model.tokenize(model.prompts({{"text": ["The digit is odd. " + filler]}}))["input_ids"]
print("even and odd give identical input ids:", bool((a.shape == b.shape) and (a == b).all()))
"""


def _dotted_eval_pickle(marker: Path) -> bytes:
    def s(x: str) -> bytes:
        d = x.encode()
        return b"\x8c" + bytes([len(d)]) + d

    def u(x: str) -> bytes:
        d = x.encode()
        return b"X" + len(d).to_bytes(4, "little") + d

    body = s("numpy.dtypes") + s("__builtins__.get") + b"\x93" + u("eval") + b"\x85R"
    body += u(f"open({str(marker)!r}, 'w').write('pwned')") + b"\x85R"
    return b"\x80\x04\x95" + len(body).to_bytes(8, "little") + body + b"."


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _cell(row: dict) -> str:
    said = row["last_stderr"] if row["exit"] else (row["warning"] or row["stdout_last"])
    said = said.split("Warning: ")[-1].replace("|", "/")
    flags = [f"exit {row['exit']}"]
    if row["traceback"]:
        flags.append("traceback")
    if row["code_ran"]:
        flags.append("**payload ran**")
    if row["note"]:
        flags.append(row["note"])
    return f"{', '.join(flags)}: `{said[:150]}`"


def table(before: Path, after: Path) -> str:
    """A markdown table of two runs of the cases, row by row."""
    a = {r["case"]: r for r in json.loads(before.read_text())["cases"]}
    b = {r["case"]: r for r in json.loads(after.read_text())["cases"]}
    lines = ["| case | before | after |", "|---|---|---|"]
    for case, row in b.items():
        old = _cell(a[case]) if case in a else "not run"
        lines.append(f"| {case} | {old} | {_cell(row)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path, default=ROOT / "src")
    ap.add_argument("--label", default="after")
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--table",
        type=Path,
        nargs=2,
        metavar=("BEFORE", "AFTER"),
        help="only print the markdown table of two result files",
    )
    args = ap.parse_args()
    if args.table:
        sys.stdout.write(table(*args.table))
        return
    from tiny_assets import tiny_llm_dir, tiny_vit_dir

    work = Path(tempfile.mkdtemp(prefix="mmtune-cases-"))
    repo = args.src.resolve().parent  # the CLI of older trees reads configs/ relative to it
    llm, vit = tiny_llm_dir(work / "llm"), tiny_vit_dir(work / "vit")
    env = {
        **os.environ,
        "PYTHONPATH": str(args.src.resolve()),
        "MMTUNE_CACHE": str(work / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("MMTUNE_DEBUG", None)
    rows: list[dict] = []

    def yaml(out: Path, extra: str = "", epochs: int = 2, data: str = "digits-ve") -> Path:
        path = work / f"{out.name}-{len(rows)}.yaml"
        path.write_text(
            f"task: {{data: {data}, data_options: {{num_samples: 80}}}}\n"
            f"model: {{llm: {llm}, vision: {vit}}}\nmit: {{layers: [3, 4]}}\n"
            f"optim: {{epochs: {epochs}, batch_size: 8, lr: 1.0e-3, head_lr_scale: 1.0}}\n"
            f"output_dir: {out}\nfeature_cache: false\nplots: false\n{extra}"
        )
        return path

    def run(argv: list, stdin: str | None = None, timeout: int = 300):
        cmd = [sys.executable, *map(str, argv)]
        p = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=repo, input=stdin
        )
        return p

    def cli(*argv):
        return run(["-m", "mmtune.cli", *argv])

    def record(
        case: str, p: subprocess.CompletedProcess, marker: Path | None = None, note: str = ""
    ) -> None:
        lines = [
            ln.strip()
            for ln in p.stderr.splitlines()
            if ln.strip() and "Loading weights" not in ln and "Writing model" not in ln
        ]
        last = lines[-1] if lines else ""
        out_lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
        warn = next((ln for ln in lines if "Warning:" in ln), "")
        rows.append(
            {
                "case": case,
                "exit": p.returncode,
                "traceback": "Traceback" in p.stderr,
                "last_stderr": last.replace(str(work), "$W")[:240],
                "warning": warn.replace(str(work), "$W")[:240],
                "stdout_last": (out_lines[-1] if out_lines else "").replace(str(work), "$W")[:160],
                "code_ran": bool(marker and marker.exists()),
                "note": note,
            }
        )
        print(
            f"[{args.label}] {case}: exit {p.returncode} | {rows[-1]['last_stderr'][:150]}",
            flush=True,
        )

    def finished(name: str, data: str = "digits-ve", epochs: int = 2) -> Path:
        out = work / name
        p = cli("train", yaml(out, epochs=epochs, data=data), "--quiet", "true")
        assert p.returncode == 0, p.stderr[-2000:]
        return out

    def last_ckpt(out: Path) -> Path:
        return sorted((out / "checkpoints").glob("epoch-*"))[-1]

    # 1. code execution from a data file
    marker = work / "marker-pickle"
    (work / "evil.pkl").write_bytes(_dotted_eval_pickle(marker))
    record(
        "1 data pickle: numpy.dtypes dotted chain (data inspect)",
        cli("data", "inspect", work / "evil.pkl"),
        marker,
    )

    # 2. code execution from a checkpoint
    out = finished("ckpt-exec", epochs=1)
    marker = work / "marker-state"
    ck = last_ckpt(out)
    for f in ck.iterdir():
        f.unlink()
    import torch

    torch.save({"payload": Payload(marker)}, ck / "state.pt")  # what torch.save of a crafted
    torch.save({"payload": Payload(marker)}, ck / "rng-rank0.pt")  # state would give
    (out / "results.json").unlink(missing_ok=True)
    record(
        "2 crafted checkpoints/epoch-001/state.pt, --resume",
        cli("train", yaml(out, epochs=2), "--quiet", "true", "--resume", "true"),
        marker,
    )

    # 3. silent corruption
    out = finished("flip", epochs=2)
    f = last_ckpt(out) / "trainable.safetensors"
    data = bytearray(f.read_bytes())
    for i in range(1, 9):  # the exponent bytes of the last 8 float32 values
        data[len(data) - 4 * i + 3] ^= 0x40
    f.write_bytes(bytes(data))
    p = cli("train", yaml(out, epochs=3), "--quiet", "true", "--resume", "true")
    record(
        "3a flipped bytes in the last checkpoint, --resume",
        p,
        note="checkpoints left: "
        + ",".join(x.name for x in sorted((out / "checkpoints").glob("epoch-*"))),
    )
    adapter = work / "adapter"
    run(["-c", PY_SAVE_ADAPTER.format(tests=str(ROOT / "tests"), path=str(adapter))])
    from safetensors.torch import load_file, save_file

    t = load_file(str(adapter / "adapter.safetensors"))
    k = sorted(t)[0]
    t[k] = torch.full_like(t[k], float("nan"))
    save_file(t, str(adapter / "adapter.safetensors"))
    record(
        "3b NaN in adapter.safetensors, from_pretrained",
        run(["-c", PY_LOAD_ADAPTER.format(tests=str(ROOT / "tests"), path=str(adapter))]),
    )
    shutil.rmtree(adapter)
    run(["-c", PY_SAVE_ADAPTER.format(tests=str(ROOT / "tests"), path=str(adapter))])
    meta = json.loads((adapter / "adapter_config.json").read_text())
    meta["config"]["form"] = "gated"
    (adapter / "adapter_config.json").write_text(json.dumps(meta))
    record(
        "3c adapter_config.json edited (form residual -> gated), from_pretrained",
        run(["-c", PY_LOAD_ADAPTER.format(tests=str(ROOT / "tests"), path=str(adapter))]),
    )

    # 4. lost runs
    out = work / "twice"
    cfg = yaml(out, epochs=200)
    first = subprocess.Popen(
        [sys.executable, "-m", "mmtune.cli", "train", str(cfg), "--quiet", "true"],
        env=env,
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "checkpoints").is_dir() and time.time() < deadline:
        time.sleep(0.1)  # the first run is training
    second = cli("train", cfg, "--quiet", "true", "--seed", "1")
    first.kill()
    first.communicate()
    record("4a two mmtune train on one output_dir at once (second)", second)
    out = finished("done", epochs=2)
    record(
        "4b train into a finished run dir (other seed)",
        cli("train", yaml(out, epochs=2), "--quiet", "true", "--seed", "5"),
    )

    # 5. silently wrong
    out = finished("lr", epochs=1)
    record(
        "5a --resume with a changed --optim.lr",
        cli(
            "train",
            yaml(out, epochs=2),
            "--quiet",
            "true",
            "--resume",
            "true",
            "--optim.lr",
            "0.01",
        ),
    )
    record(
        "5b --resume on an empty dir",
        cli("train", yaml(work / "empty", epochs=1), "--quiet", "true", "--resume", "true"),
    )
    for keep in (-1, 0):
        out = work / f"keep{keep}"
        p = cli("train", yaml(out, epochs=2), "--quiet", "true", "--keep_checkpoints", str(keep))
        left = ",".join(x.name for x in sorted((out / "checkpoints").glob("epoch-*")))
        record(f"5c keep_checkpoints: {keep}", p, note=f"checkpoints left: {left or 'none'}")
    snli = work / "snli"
    (snli / "Flickr30K" / "flickr30k_images").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32)).save(snli / "Flickr30K" / "flickr30k_images" / "1.jpg")

    def snli_rows(rows_: list[dict]) -> Path:
        for split in ("train", "dev", "test"):
            (snli / f"snli_ve_{split}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows_)
            )
        return snli

    base = [
        {
            "Flikr30kID": "1.jpg",
            "pairID": f"p{i}",
            "sentence2": f"A thing {i}.",
            "gold_label": "entailment",
        }
        for i in range(3)
    ]
    record(
        "5d two SNLI-VE rows sharing a pairID (data inspect)",
        cli("data", "inspect", snli_rows([*base, {**base[0], "sentence2": "Other."}])),
    )
    record(
        "5e sentence2: null (data inspect)",
        cli("data", "inspect", snli_rows([*base, {**base[1], "pairID": "q", "sentence2": None}])),
    )
    ref = work / "refcoco"
    (work / "images" / "train2014").mkdir(parents=True)
    ref.mkdir()
    Image.new("RGB", (41, 30)).save(work / "images" / "train2014" / "a.jpg")

    def refcoco(poly: list[float]) -> Path:
        (ref / "instances.json").write_text(
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a.jpg", "height": 30, "width": 40}],
                    "annotations": [{"id": 7, "image_id": 1, "segmentation": [poly]}],
                }
            )
        )
        refs = [
            {
                "ref_id": r,
                "ann_id": 7,
                "image_id": 1,
                "split": s,
                "sentences": [{"sent_id": r, "sent": "the square"}],
            }
            for r, s in enumerate(["train", "val", "test"] * 4)
        ]
        (ref / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
        return ref / "refs(unc).p"

    square = [5.0, 5.0, 20.0, 5.0, 20.0, 20.0, 5.0, 20.0]
    path = refcoco(square)
    record(
        "5f image 41x30, instances.json says 40x30 (train)",
        cli(
            "train",
            yaml(work / "size", epochs=1),
            "--quiet",
            "true",
            "--task.data",
            path,
            "--task.data_options",
            "{}",
            "--optim.batch_size",
            "2",
        ),
    )
    Image.new("RGB", (40, 30)).save(work / "images" / "train2014" / "a.jpg")
    path = refcoco([5.0, float("nan"), 20.0, 5.0, 20.0, 20.0])
    record("5g NaN polygon (data inspect)", cli("data", "inspect", path))

    def mmsa(name: str, **change) -> Path:
        rng = np.random.default_rng(0)
        d = {}
        for split in ("train", "valid", "test"):
            d[split] = {
                "raw_text": [f"{split} sentence {i}" for i in range(4)],
                "audio": rng.normal(size=(4, 6, 5)).astype(np.float32),
                "vision": rng.normal(size=(4, 5, 20)).astype(np.float32),
                "regression_labels": np.array([-3.0, -0.4, 0.0, 2.6], np.float32),
                "audio_lengths": [6, 3, 1, 2],
                "vision_lengths": [5, 5, 2, 1],
                "id": [f"v{i}" for i in range(4)],
            }
            d[split].update(change)
        p = work / f"{name}.pkl"
        p.write_bytes(pickle.dumps(d, protocol=4))
        return p

    record(
        "5h a modality entirely NaN (data inspect)",
        cli("data", "inspect", mmsa("nan", vision=np.full((4, 5, 20), np.nan, np.float32))),
    )
    record(
        "5i zero-length frames (data inspect)",
        cli("data", "inspect", mmsa("zero", audio_lengths=[6, 0, 1, 2])),
    )
    record(
        "5j a 10,000-word text: 'even' vs 'odd'",
        run(["-c", PY_TRUNCATION.format(llm=str(llm), vit=str(vit))]),
    )
    done = work / "done"
    Image.new("RGB", (16, 16)).save(work / "x.png")
    np.savez(work / "f.npz", audio=np.zeros((3, 5), np.float32))
    record(
        "5k predict --frames on an image run",
        cli(
            "predict",
            done,
            "The digit is even.",
            "--image",
            work / "x.png",
            "--frames",
            work / "f.npz",
        ),
    )

    # 6. raw tracebacks, errors without a file
    record(
        "6a typo inside data_options",
        cli(
            "train",
            yaml(work / "typo", epochs=1),
            "--quiet",
            "true",
            "--task.data_options",
            "{num_samples: 80, seeed: 1}",
        ),
    )
    record(
        "6b decay_every: 0",
        cli("train", yaml(work / "decay", epochs=1), "--quiet", "true", "--optim.decay_every", "0"),
    )
    bad = work / "bad.yaml"
    bad.write_text("task: {data: digits-ve\noptim: [\n")
    record("6c YAML parse error", cli("train", bad))
    for what, name, cut in (("6d", "trainable.safetensors", 64), ("6e", "config.json", 20)):
        out = finished(f"trunc-{name}", epochs=1)
        f = out / "final" / name
        f.write_bytes(f.read_bytes()[:cut])
        record(f"{what} truncated final/{name}, eval", cli("eval", out))
    out = finished("shape", epochs=1)
    t = load_file(str(out / "final" / "trainable.safetensors"))
    k = next(x for x in sorted(t) if t[x].ndim == 2)
    t[k] = torch.zeros(t[k].shape[0] + 1, t[k].shape[1])
    save_file(t, str(out / "final" / "trainable.safetensors"))
    if (out / "final" / "manifest.json").exists():
        sys.path.insert(0, str(args.src.resolve()))
        from mmtune.utils.io import write_manifest

        m = json.loads((out / "final" / "manifest.json").read_text())
        write_manifest(out / "final", m.pop("files"), **m)
    record("6f final weights of the wrong shape, eval", cli("eval", out))
    out = finished("tlast", epochs=2)
    f = last_ckpt(out) / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    (out / "results.json").unlink()
    record(
        "6g truncated last checkpoint, --resume",
        cli("train", yaml(out, epochs=3), "--quiet", "true", "--resume", "true"),
    )
    (work / "afile").write_text("x")
    record(
        "6h output_dir under a file",
        cli("train", yaml(work / "afile" / "run", epochs=1), "--quiet", "true"),
    )
    record(
        "6i output_dir in /sys",
        cli("train", yaml(Path("/sys/mmtune-run"), epochs=1), "--quiet", "true"),
    )
    mnt = work / "mnt"
    mnt.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)]).returncode
        == 0
    ):
        shutil.copytree(done, mnt / "done")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)])
        record(
            "6j output_dir read-only", cli("train", yaml(mnt / "new", epochs=1), "--quiet", "true")
        )
        p = cli("eval", mnt / "done")
        record("6k eval on a read-only run dir", p)
        subprocess.run(["umount", "-l", str(mnt)])
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)])
        record(
            "6l full disk (48 KB tmpfs)",
            cli("train", yaml(mnt / "run", epochs=1), "--quiet", "true"),
        )
        subprocess.run(["umount", "-l", str(mnt)])
    jl = work / "snli_ve_train.jsonl"
    jl.write_bytes(b"\xff\xfe\x00garbage\n")
    record("6m unreadable jsonl (data inspect)", cli("data", "inspect", jl))
    sent = finished("sent", data="movie-sentiment", epochs=1)
    (work / "notnpz.npz").write_text("not an archive")
    record(
        "6n --frames that is not an npz",
        cli("predict", sent, "A fine film.", "--frames", work / "notnpz.npz"),
    )
    record(
        "6o --out pointing at a directory",
        cli("predict", done, "The digit is odd.", "--image", work / "x.png", "--out", work),
    )
    np.savez(
        work / "big.npz",
        audio=np.full((3, 5), 1e30, np.float32),
        vision=np.zeros((2, 20), np.float32),
    )
    record(
        "6p a 1e30 frame (predict)",
        cli("predict", sent, "A fine film.", "--frames", work / "big.npz"),
    )

    # 7. files
    old = os.umask(0o022)
    out = finished("umask", epochs=1)
    os.umask(old)
    modes = sorted(
        {
            oct(p.stat().st_mode & 0o777)
            for p in out.rglob("*")
            if p.is_file() and not p.name.startswith(".lock")
        }
    )
    rows.append(
        {
            "case": "7a modes of a run's files under umask 022",
            "exit": 0,
            "traceback": False,
            "last_stderr": "",
            "warning": "",
            "stdout_last": "",
            "code_ran": False,
            "note": " ".join(modes),
        }
    )
    print(f"[{args.label}] 7a modes: {modes}")

    result = {"label": args.label, "src": str(args.src), "cases": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
