"""Distill a teacher into a student with on-policy GKD.

    accelerate launch gkd/train.py --model_name_or_path S --teacher_model_name_or_path T \\
        --dataset_name data.jsonl --lmbda 0.5 --beta 0.5 --use_peft --output_dir runs/x

Reads top to bottom: parse config -> load and validate data -> check the models -> load them -> train -> save.
Everything a user can get wrong is checked before the first model weight is read.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script (`accelerate launch gkd/train.py`), sys.path[0] is gkd/ itself: put the repo root there so
    # `import gkd` works without an install and gkd's modules cannot shadow installed packages.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import logging

from gkd.cli import hide_checkpointing_deprecations, run

logger = logging.getLogger("gkd")


def parse_args(argv: list[str] | None = None):
    from trl import TrlParser

    from gkd.config import GKDConfig, ModelArguments, ScriptArguments

    parser = TrlParser((ScriptArguments, ModelArguments, GKDConfig))
    # TrlParser reads --config itself before argparse sees the arguments; this entry only documents it in --help.
    parser.add_argument("--config", help="A YAML file of the options below; command-line flags override it.")
    script_args, model_args, training_args = parser.parse_args_and_config(argv)[:3]
    return script_args, model_args, training_args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    hide_checkpointing_deprecations()
    script_args, model_args, training_args = parse_args(argv)

    from gkd import data, launch, models
    from gkd.outputs import check_output_dir, write_run_config
    from gkd.reliability import resolve_resume, stopped_early

    launch.warn_about_launch(training_args)  # a DeepSpeed config that is not active, ranks that came up alone
    check_output_dir(training_args)
    training_args.resume_from_checkpoint = resolve_resume(training_args)  # `last` -> the newest complete checkpoint
    conversations = data.load_conversations(script_args.dataset_name)
    eval_conversations = (
        data.load_conversations(script_args.eval_dataset_name) if script_args.eval_dataset_name else None
    )
    tokenizer = models.load_tokenizer(model_args.model_name_or_path, model_args.trust_remote_code)
    models.check_same_vocabulary(
        model_args.model_name_or_path, model_args.teacher_model_name_or_path, model_args.trust_remote_code
    )
    stop_ids = models.stop_token_ids(tokenizer, model_args.model_name_or_path)
    train_dataset = _encode(conversations, tokenizer, training_args, stop_ids, script_args.dataset_name)
    eval_dataset = (
        _encode(eval_conversations, tokenizer, training_args, stop_ids, script_args.eval_dataset_name)
        if eval_conversations
        else None
    )

    from gkd.trainer import GKDTrainer

    student = models.load_causal_lm(
        model_args.model_name_or_path, model_args.dtype, model_args.trust_remote_code, model_args.attn_implementation
    )
    teacher = models.load_teacher(
        model_args.teacher_model_name_or_path,
        model_args.dtype,
        model_args.trust_remote_code,
        model_args.attn_implementation,
    )
    trainer = GKDTrainer(
        model=student,
        teacher=teacher,
        args=training_args,
        stop_token_ids=stop_ids,
        processing_class=tokenizer,
        peft_config=models.lora_config(model_args) if model_args.use_peft else None,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
    )
    write_run_config(trainer, script_args, model_args, training_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if not stopped_early(trainer):  # SIGTERM/SIGINT: the checkpoint is the result; too many NaN steps raise instead
        trainer.save_model(training_args.output_dir)
        if trainer.accelerator.is_main_process:
            logger.info("saved the %s to %s", "adapter" if model_args.use_peft else "model", training_args.output_dir)
    launch.leave_process_group(trainer.accelerator)  # all ranks together, no gloo clean-up left for exit


def _encode(conversations, tokenizer, training_args, stop_ids, name):
    from datasets import Dataset

    from gkd import data

    samples, stats = data.encode_conversations(
        conversations, tokenizer, training_args.max_length, training_args.max_new_tokens, stop_ids
    )
    logger.info(
        "%s: %d records (%d prompt-only), %d cut to fit max_length=%d",
        name,
        stats.num_records,
        stats.num_prompt_only,
        stats.num_truncated,
        training_args.max_length,
    )
    if stats.num_prompt_only and training_args.lmbda < 1 and not training_args.seq_kd:
        logger.warning(
            "%d prompt-only records have no response: they train only on on-policy steps (lmbda=%s); "
            "add --seq_kd to have the teacher answer them on the other steps",
            stats.num_prompt_only,
            training_args.lmbda,
        )
    return Dataset.from_list(samples)


if __name__ == "__main__":
    run(main)
