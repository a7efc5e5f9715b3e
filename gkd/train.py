"""Distill a teacher into a student with on-policy GKD.

    accelerate launch gkd/train.py --model_name_or_path S --teacher_model_name_or_path T \\
        --dataset_name data.jsonl --lmbda 0.5 --beta 0.5 --use_peft --output_dir runs/x

Reads top to bottom: parse config -> check the output folder and the models -> load and validate data -> load the
models -> train -> save. Everything a user can get wrong is checked before the first model weight is read.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script (`accelerate launch gkd/train.py`), sys.path[0] is gkd/ itself: put the repo root there so
    # `import gkd` works without an install and gkd's modules cannot shadow installed packages.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import logging

from gkd.cli import exit_if_signalled, hide_checkpointing_deprecations, parse, run

logger = logging.getLogger("gkd")


def parse_args(argv: list[str] | None = None):
    from gkd.config import GKDConfig, ModelArguments, ScriptArguments, check_together
    from gkd.launch import with_cpu_deepspeed_backend

    argv = with_cpu_deepspeed_backend(list(sys.argv[1:] if argv is None else argv))
    script_args, model_args, training_args = parse((ScriptArguments, ModelArguments, GKDConfig), argv)
    check_together(script_args, model_args, training_args)
    return script_args, model_args, training_args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("torch").setLevel(logging.WARNING)  # its INFO lines (cache stats at exit) are not ours to show
    hide_checkpointing_deprecations()
    script_args, model_args, training_args = parse_args(argv)

    from gkd import data, launch, models, run_folder, teachers
    from gkd.folders import check_not_busy

    launch.warn_about_launch(training_args)  # a DeepSpeed config that is not active, ranks that came up alone
    if training_args.process_index == 0:
        check_not_busy(training_args.output_dir)  # another run's pid, before its checkpoints are read
    training_args.resume_from_checkpoint = run_folder.resolve_resume(training_args, model_args, script_args)
    # --teacher NAME=SOURCE, when several: their folders are inputs too
    teacher_sources = [spec.source for spec in model_args.teacher_specs if spec.kind != "server"]
    run_folder.check(training_args, [model_args.model_name_or_path, model_args.teacher_model_name_or_path,
                                     model_args.teacher_logits_path, script_args.dataset_name,
                                     script_args.eval_dataset_name, *teacher_sources])
    student_ref = models.ModelRef(model_args.model_name_or_path, model_args.model_revision,
                                  model_args.trust_remote_code, "--model_name_or_path")
    models.check_model(student_ref)
    models.check_context(student_ref, training_args.max_length)
    tokenizer = models.load_tokenizer(student_ref)
    teacher_ref = teachers.check_teacher(model_args, training_args, tokenizer, student_ref)
    if model_args.use_peft:
        models.check_lora_targets(student_ref, model_args.lora_target_modules)
    stop_ids = models.stop_token_ids(tokenizer, student_ref)

    # --cross_tokenizer: each teacher's tokenizer beside the student's
    pair = teachers.cross_tokenizer_pair(model_args, training_args, tokenizer, stop_ids, teacher_ref)

    pairs = list(pair.values()) if isinstance(pair, dict) else [pair] if pair else []  # one per teacher
    train_dataset, eval_dataset, data_fingerprint = data.training_datasets(
        script_args, training_args, tokenizer, stop_ids, model_args.teacher_kind,
        [spec.name for spec in model_args.teacher_specs], model_args.default_teacher,
        [(each.teacher, each.teacher_stop_ids) for each in pairs])
    teacher = teachers.open_teacher(model_args, training_args, tokenizer, stop_ids, len(train_dataset),
                                    data_fingerprint, teacher_ref, pair)
    from gkd.rollouts import open_rollouts

    rollouts = open_rollouts(model_args, training_args, tokenizer)  # --rollout_server_url, checked before any weight

    if training_args.process_index == 0:
        run_folder.prepare(training_args)  # lock it; move an overwritten run aside; clear a failed start's files
    training_args.distributed_state.wait_for_everyone()

    from gkd.trainer import GKDTrainer

    student = models.load_causal_lm(student_ref, model_args.dtype, model_args.attn_implementation)
    trainer = GKDTrainer(
        model=student,
        teacher=teacher,
        args=training_args,
        stop_token_ids=stop_ids,
        processing_class=tokenizer,
        peft_config=models.lora_config(model_args) if model_args.use_peft else None,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        rollouts=rollouts,
    )
    run_folder.write_run_config(trainer, script_args, model_args, training_args)
    signals = trainer.stop_on_signal
    exit_if_signalled()  # a signal during start-up whose exception a library swallowed: do not train
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        from gkd.guards import raise_if_tripped

        raise_if_tripped(trainer)  # too many non-finite steps: the checkpoint is saved, the run is an error
        if not signals.stopped_by_signal():  # SIGTERM/SIGINT: the checkpoint is the result
            run_folder.save_final_model(trainer, training_args.output_dir)
            if trainer.accelerator.is_main_process:
                kind = "adapter" if model_args.use_peft else "model"
                logger.info("saved the %s to %s", kind, training_args.output_dir)
        launch.leave_process_group(trainer.accelerator)  # all ranks together, no gloo clean-up left for exit
    finally:
        signals.release()  # only now: a signal up to here finds the run's work done and exits 0 (report below)
    signals.report_after_save()


def cli() -> None:
    """The `gkd-train` console script."""
    run(main)


if __name__ == "__main__":
    cli()
