"""Generate text from a trained model: BOS + the encoded prompt, then N sampled tokens.

    python scripts/sample.py --artifact runs/ID/final_model.golf --tokenizer T --prompt "The" --tokens 200
    python scripts/sample.py --checkpoint runs/ID/checkpoint --tokenizer T --temperature 0
    NUM_LAYERS=2 MODEL_DIM=64 ... python scripts/sample.py --reference-state final_state.npz --tokenizer T

Prints the prompt followed by the generated text. Temperature 0 is greedy
(argmax); --top-k K samples among the K most likely tokens; --seed fixes the
draw. No KV cache: each token is one forward pass over a window of at most
train_seq_len tokens (compiled once per window length).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import add_config_args, add_model_source_args, load_model_source, run_main, setup_devices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(parser)
    parser.add_argument("--tokenizer", help="SentencePiece .model (default: the config's data.tokenizer_path)")
    parser.add_argument("--prompt", default="", help="text the generation continues (default: none, just BOS)")
    parser.add_argument("--tokens", type=int, default=100, metavar="N", help="tokens to generate (default 100)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K most likely (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    add_config_args(parser)
    args = parser.parse_args()
    if args.tokens < 0:
        parser.error(f"--tokens must be >= 0, got {args.tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0, got {args.top_k}")
    setup_devices(args.cpu_devices)

    from golfjax.data.tokenizer import load_tokenizer
    from golfjax.sample import sample_text

    cfg, params = load_model_source(args)
    tok_path = args.tokenizer or cfg.data.tokenizer_path
    if not tok_path:
        raise ValueError("no tokenizer: pass --tokenizer PATH.model (the model's config names none)")
    sp = load_tokenizer(tok_path, cfg.model.vocab_size)
    out = sample_text(params, cfg, sp, args.prompt, args.tokens, args.temperature, args.top_k, args.seed)
    print(out.text)
    return 0


if __name__ == "__main__":
    run_main(main)
