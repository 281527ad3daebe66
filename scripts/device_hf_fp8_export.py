"""Load `yxanul export --fp8` in transformers on CUDA and compare it with the BF16 export of the same checkpoint.

Exports RUN twice (BF16 and --fp8), loads both with ``AutoModelForCausalLM.from_pretrained(..., device_map=DEVICE)``
with no edit to the written folders, and records in one JSON: the transformers version, the module counts
(``FP8Linear`` / ``Linear``), logits relative L2 and top-1 agreement of the FP8 model against the BF16 one, their
losses, and greedy continuations of both. Without --run a freshly initialised checkpoint of --model is written
first (loading and the numerics of the FP8 path are still checked; a trained run makes top-1 meaningful).

Usage: python scripts/device_hf_fp8_export.py OUT_JSON [--run RUN] [--model yxanul-197m] [--batch 8] [--seq 1024]
"""
import argparse
import dataclasses
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from safetensors.torch import save_file

from yxanul.checkpoint.export import export_hf
from yxanul.config import load_model_config
from yxanul.io import atomic_write_json
from yxanul.model import Yxanul


def fresh_run(root: Path, model: str) -> Path:
    cfg = load_model_config(model)
    torch.manual_seed(0)
    m = Yxanul(cfg)
    step = root / "run" / "checkpoints" / "step_00000000"
    step.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(step / "model.safetensors"))
    meta = {"step": 0, "model_config": dataclasses.asdict(cfg), "tokenizer": None}
    (step / "meta.json").write_text(json.dumps(meta))
    (root / "run" / "checkpoints" / "latest").write_text("step_00000000\n")
    return root / "run"


def load(folder: Path, device: str):
    import transformers

    from packaging.version import Version

    # BF16 for the unquantized tensors (4.x loads FP32 unless told; `dtype` replaced `torch_dtype` in 4.56)
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map=device,
                                                              **{key: torch.bfloat16}).eval()
    kinds: dict[str, int] = {}
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            kinds[type(mod).__name__] = kinds.get(type(mod).__name__, 0) + 1
    return model, kinds


def compare(bf16, fp8, ids: torch.Tensor, new_tokens: int) -> dict:
    with torch.no_grad():
        a = bf16(ids, labels=ids)
        b = fp8(ids, labels=ids)
        la, lb = a.logits.float(), b.logits.float()
        rel = float((lb - la).norm() / la.norm())
        top1 = float((la.argmax(-1) == lb.argmax(-1)).float().mean())
        prompt = ids[:1, :16]
        kw = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        ga = bf16.generate(prompt, **kw)[0, 16:].tolist()
        gb = fp8.generate(prompt, **kw)[0, 16:].tolist()
    return {"logits_rel_l2": rel, "top1_agreement": top1, "loss_bf16": float(a.loss), "loss_fp8": float(b.loss),
            "loss_rel_diff": abs(float(b.loss) - float(a.loss)) / abs(float(a.loss)),
            "greedy_bf16": ga, "greedy_fp8": gb, "greedy_equal": ga == gb,
            "greedy_common_prefix": next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), len(ga))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_json")
    ap.add_argument("--run", default=None, help="run folder or checkpoint (default: a fresh --model checkpoint)")
    ap.add_argument("--model", default="yxanul-197m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    import transformers

    res: dict = {"transformers": transformers.__version__, "torch": torch.__version__, "run": args.run,
                 "model": args.model, "device": args.device}
    if torch.cuda.is_available():
        res["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        try:
            run = Path(args.run) if args.run else fresh_run(root, args.model)
            export_hf(run, root / "hf", dtype="bf16")
            rep = export_hf(run, root / "hf8", fp8=True)
            res["quantization_config"] = rep["quantization_config"]
            bf16, res["bf16_linears"] = load(root / "hf", args.device)
            fp8, res["fp8_linears"] = load(root / "hf8", args.device)
            res["loaded"] = True
            vocab = bf16.config.vocab_size
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, min(vocab, 256), (args.batch, args.seq), generator=g).to(args.device)
            res.update(compare(bf16, fp8, ids, args.new_tokens))
        except Exception as e:  # noqa: BLE001 - the failure is the measurement
            res.setdefault("loaded", False)
            res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            res["traceback"] = traceback.format_exc()
    atomic_write_json(args.out_json, res)
    print(json.dumps({k: v for k, v in res.items() if k != "traceback"}, indent=2))
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    sys.exit(main())
