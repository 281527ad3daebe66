"""`yxanul memory`: training-memory estimate by component and precision (and, on CUDA, the measured peak)."""
from __future__ import annotations

from ._common import add_model_policy_args, human_bytes, print_json, table


def register(sub):
    p = sub.add_parser("memory", help="estimate the device memory of a training step")
    add_model_policy_args(p)
    p.add_argument("--batch", type=int, default=8, help="micro-batch size (default 8)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default min(2048, max_seq_len))")
    p.add_argument("--optimizer", default="adamw", help="adamw (2 states) or sgd (momentum)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--precision", choices=["bf16", "fp8"], default=None,
                   help="training precision (default: fp8 if the policy enables it)")
    p.add_argument("--activation-checkpointing", action="store_true", help="keep only block inputs")
    p.add_argument("--fp8-activation-cache", action="store_true", default=None,
                   help="FP8 linears save their quantized input (default: the policy recipe)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="where training runs; decides the loss it uses (default cuda)")
    p.add_argument("--fused-ce", choices=["auto", "on", "off"], default="auto",
                   help="the training config's fused_ce: auto (fused loss on CUDA), on or off (default auto)")
    p.add_argument("--compiled", choices=["none", "blocks", "model"], default="none",
                   help="torch.compile: none (eager), blocks (each block, as training compiles them) or model (the "
                        "whole model and its loss, as a plain model is compiled); inductor saves less. With --measure "
                        "the measured steps are compiled the same way (default none)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--measure", action="store_true", help="run real training steps on CUDA and compare")
    p.add_argument("--steps", type=int, default=3, help="training steps for --measure (default 3)")
    p.set_defaults(func=run)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def run(args):
    from ..config import load_model_config
    from ..memory import MemoryOptions, estimate, note_comparison
    from ..precision import load_policy

    cfg = load_model_config(args.model)
    pol = load_policy(args.config, strict=False if args.lax else None)
    opts = MemoryOptions(batch=args.batch, seq=args.seq, optimizer=args.optimizer, grad_accum=args.grad_accum,
                         precision=args.precision, activation_checkpointing=args.activation_checkpointing,
                         fp8_activation_cache=args.fp8_activation_cache, device=args.device,
                         fused_ce=args.fused_ce, compiled=args.compiled)
    est = estimate(cfg, pol, opts)
    opts = MemoryOptions(**{**opts.__dict__, "seq": est["seq"]})
    other = None
    if args.precision is None or not args.json or cfg.name == "yxanul-197m-seed":
        other_mode = "bf16" if est["precision"] == "fp8" else "fp8"
        other = estimate(cfg, pol, MemoryOptions(**{**opts.__dict__, "precision": other_mode}))
    bf16, fp8 = (est, other) if est["precision"] == "bf16" else (other, est)
    measured = None
    if args.measure:
        from ..memory import measure_peak
        measured = measure_peak(cfg, pol, opts, steps=args.steps)
    comparison = None
    if cfg.name == "yxanul-197m-seed":  # the note's table against the eager estimate (every term counted)
        if opts.compiled == "none":
            comparison = note_comparison(bf16, fp8)
        else:
            eager = {**opts.__dict__, "compiled": "none"}
            comparison = note_comparison(estimate(cfg, pol, MemoryOptions(**{**eager, "precision": "bf16"})),
                                         estimate(cfg, pol, MemoryOptions(**{**eager, "precision": "fp8"})))

    if args.json:
        out = dict(est)
        if measured is not None:
            out["measured"] = measured
        if comparison is not None:
            out["note_comparison"] = comparison
        print_json(out)
        return 0

    rows = []
    pb = bf16["breakdown"]
    names = {"embeddings": "Embeddings", "layer_norms": f"LayerNorms ({cfg.n_layers} layers)",
             "attention": f"Attention ({cfg.n_layers} layers)", "ffn": f"FFN ({cfg.n_layers} layers)",
             "output_head": "Output head", "other": "Other"}
    for c, label in names.items():
        if c not in pb["params_by_component"]:
            continue
        wb, wf = bf16["breakdown"]["weights_by_component"].get(c, 0), fp8["breakdown"]["weights_by_component"].get(c, 0)
        rows.append([label, f"{pb['params_by_component'][c]:,}", _mb(wb), _mb(wf), _mb(wb - wf)])

    def row(label, key):
        rows.append([label, "", _mb(bf16[key]), _mb(fp8[key]), _mb(bf16[key] - fp8[key])])

    row("Scale factors (FP32)", "scales_bytes")
    rows.append(["Compute weights", f"{bf16['params']:,}", _mb(bf16["weights_bytes"] + bf16["scales_bytes"]),
                 _mb(fp8["weights_bytes"] + fp8["scales_bytes"]),
                 _mb(bf16["weights_bytes"] + bf16["scales_bytes"] - fp8["weights_bytes"] - fp8["scales_bytes"])])
    d = pb["dtypes"]
    row(f"Master weights ({d['master_weights'].upper()})", "master_weights_bytes")
    row(f"Gradients ({d['grads'].upper()})", "grads_bytes")
    row(f"Optimizer states ({args.optimizer}, {d['optimizer_states'].upper()})", "optimizer_bytes")
    ck = " ckpt" if opts.activation_checkpointing else ""
    row(f"Activations ({cfg.n_layers} layers{ck})", "activations_bytes")
    row(f"Loss: {est['loss']} cross-entropy on {opts.device} (V={cfg.vocab_size:,})", "logits_bytes")
    row("Total Memory", "total_bytes")
    print(f"Memory Layout for {cfg.name} ({bf16['params']:,} params; micro-batch {opts.batch} x seq {opts.seq}, "
          f"grad accum {opts.grad_accum}, {args.optimizer}, recipe {fp8['recipe']}"
          f"{'' if opts.compiled == 'none' else ', compiled ' + opts.compiled}"
          f"{', FP8 activation cache' if fp8['fp8_activation_cache'] else ''})")
    print(table(rows, ["Component", "Params", "BF16 training", "FP8 training", "Savings"], "lrrrr"))
    print("Compute weights are the copies alive during a step: autocast's BF16 weight copies (saved for backward), "
          "FP8 weights + transposes; the embedding lookup and norms read the master weights.")
    if opts.compiled != "none":
        print("Compiled: the total is the larger of the start of the backward pass (compute weights, activations, "
              "the loss; gradients only with accumulation) and its end (every gradient), plus master weights and "
              "optimizer states; the rows do not add up to it.")
    a = est["breakdown"]["activations"]
    print()
    print(f"Activations per layer ({est['precision'].upper()}, residual stream "
          f"{pb['dtypes']['residual_stream'].upper()}): {human_bytes(a['per_layer_bytes'])}")
    print(table([[k, human_bytes(v)] for k, v in a["per_layer"].items()] +
                [[f"global: {k}", human_bytes(v)] for k, v in a["global"].items()],
                ["saved tensor", "bytes"], "lr"))
    if comparison is not None:
        print()
        print("The design note's Memory Layout table, checked (decimal MB; FP8 column = the note's 'Mixed Precision'):")
        crow = [[c["row"], f"{c['note_bf16_mb']:,}", _mb(c["correct_bf16_bytes"]), f"{c['note_mixed_mb']:,}",
                 _mb(c["correct_mixed_bytes"]), "WRONG" if c["wrong"] else "ok", c["why"]] for c in comparison]
        print(table(crow, ["Row", "Note BF16", "Correct", "Note mixed", "Correct", "", "Why"], "lrrrrll"))
    if measured is not None:
        print()
        print(f"Measured on {measured['device']}: peak {human_bytes(measured['peak_bytes'])} "
              f"(torch.cuda.max_memory_allocated over {measured['steps']} steps) vs estimate "
              f"{human_bytes(est['total_bytes'])}: {100 * (est['total_bytes'] / measured['peak_bytes'] - 1):+.1f}%")
    return 0
