"""Export a model folder (a gkd student, a `--use_peft` run, any Llama, Qwen2 or Mistral) to GGUF for llama.cpp/Ollama.

    python scripts/export_gguf.py --model_name_or_path runs/my-student --output_file student.Q8_0.gguf \
        --quantization q8_0

The same command as `gkd-export-gguf` and `python -m gkd.tools.export_gguf`; see gkd/tools/export_gguf.py.
"""

from gkd.cli import command

if __name__ == "__main__":
    command("gkd.tools.export_gguf")
