"""Converts a transformers checkpoint (safetensors or .bin shards + config.json) into ours: model.safetensors with
gpt-fast names, q/k permuted to the interleaved RoPE layout, our config.json, and the tokenizer files copied over.
The source folder is left as it is; the result goes to checkpoints/<name> unless --out_dir says otherwise.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/hf/meta-llama/Llama-3.2-1B-Instruct
"""
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cli  # noqa: E402
from checkpoint import CheckpointError, check_output, load_without_code, save_checkpoint, written_then_renamed  # noqa: E402
from scripts.hf_format import config_from_hf, from_hf_weights  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    weights = {}
    for f in files:
        if f.suffix != ".safetensors":  # a pickle: unpickled without running code, or refused
            weights.update(load_without_code(f, map_location="cpu"))
            continue
        try:
            weights.update(load_file(str(f)))
        except Exception as e:
            raise CheckpointError(f"cannot read {f} (truncated or corrupt?): {e}") from None
    return weights


def convert_hf_checkpoint(checkpoint_dir: Path, out_dir: Path | None = None, force: bool = False) -> Path:
    """Converts checkpoint_dir into out_dir (default checkpoints/<name>), which must not exist unless force; returns
    out_dir. The folder is written under a temporary name and renamed, so a failure leaves nothing half-converted."""
    checkpoint_dir = Path(checkpoint_dir)
    out_dir = check_output(out_dir or Path("checkpoints") / checkpoint_dir.name, force, (checkpoint_dir,), "--out_dir")
    config_path = checkpoint_dir / "config.json"
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {config_path}: {e}") from None
    config = config_from_hf(hf_config, name=checkpoint_dir.name)
    try:
        state_dict = from_hf_weights(read_hf_weights(checkpoint_dir), config)
    except KeyError as e:
        raise CheckpointError(f"{checkpoint_dir} lacks weight {e} that a {config.architecture} needs") from None
    with written_then_renamed(out_dir) as tmp:
        save_checkpoint(state_dict, config, tmp)
        for name in TOKENIZER_FILES:
            if (checkpoint_dir / name).is_file():
                shutil.copy(checkpoint_dir / name, tmp / name)
    return out_dir


@cli.program
def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="folder with transformers weights")
    parser.add_argument("--out_dir", type=Path, default=None, help="where to write ours (default: checkpoints/<name>)")
    parser.add_argument("--force", action="store_true", help="replace --out_dir if it exists")
    args = parser.parse_args(argv)
    out = convert_hf_checkpoint(args.checkpoint_dir, args.out_dir, args.force)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")


if __name__ == "__main__":
    main()
