"""A pretrained student with a tokenizer of its own, built offline: a byte-level BPE model cut to its first N tokens.

    python examples/truncated_vocab_student.py --model_name_or_path ~/.cache/gkd/smollm2-135m-pruned-22l \\
        --vocab_size 8192 --output_dir ~/.cache/gkd/smollm2-135m-pruned-22l-v8k

BPE numbers its tokens in merge order, so the first N ids with the merges that made them are a complete tokenizer of
their own: it writes the same text in shorter pieces (every token it keeps is the original's, byte for byte). The
embedding keeps those N rows. Against the original teacher the two tokenizers differ wherever the teacher has a token
the cut one lacks, which is what `--cross_tokenizer` aligns (docs/results.md, "Across tokenizers"): a real pair of
pretrained models with different vocabularies, where none other can be had offline.
"""

import argparse
import json
import shutil
from pathlib import Path


def truncate_tokenizer(source: Path, output: Path, vocab_size: int) -> int:
    """Writes `output/tokenizer.json` with the first `vocab_size` ids; returns how many merges it kept."""
    spec = json.loads((source / "tokenizer.json").read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise SystemExit(f"{source}: not a BPE tokenizer ({model.get('type')})")
    vocab = model["vocab"]
    first_merge = min(vocab[a + b] for a, b in (merge if isinstance(merge, list) else merge.split(" ")
                                                for merge in model["merges"][:50]))
    kept_merges = model["merges"][:max(0, vocab_size - first_merge)]
    model["vocab"] = {token: index for token, index in vocab.items() if index < vocab_size}
    model["merges"] = kept_merges
    spec["added_tokens"] = [token for token in spec.get("added_tokens", []) if token["id"] < vocab_size]
    (output / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return len(kept_merges)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, output = Path(args.model_name_or_path).expanduser(), Path(args.output_dir).expanduser()
    if output.exists():
        raise SystemExit(f"{output} exists: give another --output_dir or remove it")
    output.mkdir(parents=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, output / name)
    merges = truncate_tokenizer(source, output, args.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(output)
    model = AutoModelForCausalLM.from_pretrained(source)
    model.resize_token_embeddings(args.vocab_size)  # the first N rows, tied head included
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    text = "The capital of France is Paris; 12345 apples."
    print(f"{output}: {len(tokenizer)} tokens ({merges} merges); {text!r} -> "
          f"{tokenizer.convert_ids_to_tokens(tokenizer(text)['input_ids'])}")


if __name__ == "__main__":
    main()
