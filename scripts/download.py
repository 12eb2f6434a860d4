"""Downloads a model from the Hugging Face Hub into checkpoints/hf/<repo_id> (weights, config, tokenizer files).

    python scripts/download.py --repo_id HuggingFaceTB/SmolLM2-360M-Instruct
    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/hf/HuggingFaceTB/SmolLM2-360M-Instruct
    python generate.py --checkpoint checkpoints/SmolLM2-360M-Instruct --compile
"""
import argparse
import sys
from pathlib import Path


def download(repo_id: str, out_root: Path = Path("checkpoints/hf"), token: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    out = out_root / repo_id
    snapshot_download(repo_id, local_dir=out, token=token,
                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"],
                      ignore_patterns=["*consolidated*", "original/*"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo_id", required=True, help="for example HuggingFaceTB/SmolLM2-360M-Instruct")
    parser.add_argument("--out_root", type=Path, default=Path("checkpoints/hf"))
    parser.add_argument("--hf_token", default=None, help="for gated models (or set HF_TOKEN)")
    args = parser.parse_args()
    try:
        out = download(args.repo_id, args.out_root, args.hf_token)
    except Exception as e:  # network, authentication or unknown repo: one line, not a traceback
        print(f"error: cannot download {args.repo_id}: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    print(f"downloaded to {out}; next: python scripts/convert_hf_checkpoint.py --checkpoint_dir {out}")


if __name__ == "__main__":
    main()
