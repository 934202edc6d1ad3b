"""Memory of one base with an adapter per predictor, against one full (merged) model per predictor.

    python bench/lora_memory.py                        # 3 predictors on a 0.16B Llama, fp32, CPU
    python bench/lora_memory.py --predictors 4 --hidden 1536 --layers 12

It builds a base (random weights), N LoRA adapters on it (PEFT, rank 16 on every linear layer,
random non-zero weights so each changes the model), and each adapter merged into a full model.
Then, in a fresh process each, it loads the N adapters the way a compiled program with
`multitask=False, lora=True` does (`FinetunedLM`, one base shared) and the N merged models
(one `FinetunedLM` each), answers one prompt with every LM, and reports the resident memory
the models added. The last line is the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))



def build(work: Path, args) -> tuple[Path, list[Path], list[Path]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bootfinetune.training.lora import merge_adapter
    from bootfinetune.testing.tiny_models import build_tiny_causal

    base = build_tiny_causal(work / "base", hidden_size=args.hidden, num_layers=args.layers,
                             num_heads=max(1, args.hidden // 64), vocab_size=args.vocab, chat_template=False)
    adapters, merged = [], []
    for i in range(args.predictors):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                                          task_type="CAUSAL_LM"))
        model.peft_config["default"].base_model_name_or_path = str(base)
        out = work / f"adapter{i}"
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
        adapters.append(out)
        merged.append(merge_adapter(out, work / f"merged{i}"))
    return base, adapters, merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--predictors", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-lora-memory-") as tmp:
        base, adapters, merged = build(Path(tmp), args)
        import math

        from safetensors import safe_open

        with safe_open(str(base / "model.safetensors"), "pt") as f:
            n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        adapter_mb = sum((a / "adapter_model.safetensors").stat().st_size for a in adapters) / 2**20
        from bootfinetune.testing.faults import resident_kib

        shared = resident_kib(adapters)
        full = resident_kib(merged)
    print(json.dumps({"predictors": args.predictors, "base_parameters": n_params, "adapter_files_mib": round(adapter_mb, 1),
                      "resident_adapters_mib": round(shared / 1024, 1), "resident_merged_mib": round(full / 1024, 1)}))
    print(f"{args.predictors} predictors: one base + adapters {shared / 1024:.0f} MiB vs {args.predictors} merged models "
          f"{full / 1024:.0f} MiB: {full / max(shared, 1):.2f}x less memory")


if __name__ == "__main__":
    main()
