"""Where the teacher's signal comes from, behind one interface (`base.Teacher`): a live model beside the student
(`live`), a cache of its top-K log-probabilities built once (`cache`), or an inference server on its own machines
(`server`); several of them, each sample routed to its own (`routed`). `check_teacher` checks a live teacher before
any data is read; `open_teacher` opens the run's one teacher, its K decided there. The trainer asks the `Teacher` it
gets and never which kind it is.
"""

from .base import CompletionPositions, SampleRequest, TargetPart, Teacher, TeacherUnavailable  # noqa: F401
from .targets import SparseTargets, completion_rows  # noqa: F401


def check_teacher(model_args, training_args, student_tokenizer, student_ref):
    """Before any data is read or weight loads: a live teacher is a usable model sharing the student's vocabulary,
    with at least --teacher_top_k tokens in it (its ModelRef is returned). A cache and a server are checked when
    `open_teacher` opens them (None returned)."""
    from .. import models
    from ..errors import ConfigError

    if model_args.teacher:  # several teachers: each checked as the run's one, its refusals named
        from ..config import named_teacher

        refs = {}
        for spec in model_args.teacher_specs:
            with named_teacher(spec.name):
                refs[spec.name] = check_teacher(model_args.for_teacher(spec), training_args, student_tokenizer,
                                                student_ref)
        return refs
    kind = model_args.teacher_kind
    if kind == "live":
        ref = models.ModelRef(model_args.teacher_model_name_or_path, model_args.teacher_model_revision,
                              model_args.trust_remote_code, "--teacher_model_name_or_path")
        models.check_model(ref)
        models.check_context(ref, training_args.max_length)
        if model_args.cross_tokenizer:  # its own vocabulary: K counts the teacher's tokens
            vocab_size = min(len(models.load_tokenizer(ref)), models.embedding_size(ref))
        else:
            embedding_sizes = {student_ref.name: models.embedding_size(student_ref),
                               ref.name: models.embedding_size(ref)}
            models.check_same_vocabulary(student_tokenizer, models.load_tokenizer(ref), ref.name, embedding_sizes,
                                         remedy=" (a teacher of another model family: add --cross_tokenizer)")
            vocab_size = min(len(student_tokenizer), *embedding_sizes.values())  # the trainer's shared vocabulary
        top_k = training_args.teacher_top_k
        if top_k is not None and top_k > vocab_size:
            vocabulary = (f"{ref.name}'s vocabulary" if model_args.cross_tokenizer else
                          f"the vocabulary {ref.name} shares with the student")
            raise ConfigError(f"--teacher_top_k {top_k} is more than the {vocab_size} tokens of {vocabulary}: give "
                              f"K <= {vocab_size}, or leave it out for the full distribution")
        return ref
    return None


def cross_tokenizer_pair(model_args, training_args, student_tokenizer, student_stop_ids: list[int], teacher_ref):
    """With --cross_tokenizer, the two tokenizers read as bytes once (`alignment.VocabularyPair`), how much of the
    student's vocabulary the teacher writes byte for byte said at start; None without it. Several teachers: a pair
    for each, by name (`teacher_ref` is then `check_teacher`'s refs by name)."""
    if not model_args.cross_tokenizer:
        return None
    from .. import models

    if model_args.teacher:
        from ..config import named_teacher

        pairs = {}
        for spec in model_args.teacher_specs:
            with named_teacher(spec.name):
                pairs[spec.name] = cross_tokenizer_pair(model_args.for_teacher(spec), training_args,
                                                        student_tokenizer, student_stop_ids,
                                                        (teacher_ref or {}).get(spec.name))
        return pairs

    teacher_tokenizer = None
    if teacher_ref is None and model_args.teacher_tokenizer_name_or_path:  # a server's or a cache's, named
        teacher_ref = models.ModelRef(model_args.teacher_tokenizer_name_or_path,
                                      trust_remote_code=model_args.trust_remote_code,
                                      flag="--teacher_tokenizer_name_or_path")
    elif teacher_ref is None and model_args.teacher_kind == "server":  # the model the server says it serves
        from .server import TeacherServer, served_model_ref

        server = TeacherServer(model_args.teacher_server_url, training_args.teacher_server_timeout,
                               training_args.teacher_server_retries)
        server.describe()
        teacher_ref = served_model_ref(server, model_args.trust_remote_code)
        try:
            teacher_tokenizer = models.load_tokenizer(teacher_ref)
        except models.ModelError as error:
            raise models.ModelError(f"{error}; name its tokenizer with --teacher_tokenizer_name_or_path (one "
                                    "teacher), or serve it under a Hub id or a path this machine has too") from None
    elif teacher_ref is None:  # a cache in the teacher's tokens keeps that tokenizer
        from .cache import teacher_tokenizer_folder

        teacher_ref = models.ModelRef(str(teacher_tokenizer_folder(model_args.teacher_logits_path)),
                                      trust_remote_code=model_args.trust_remote_code, flag="--teacher_logits_path")
    return vocabulary_pair(student_tokenizer, student_stop_ids, teacher_ref, teacher_tokenizer)


def vocabulary_pair(student_tokenizer, student_stop_ids: list[int], teacher_ref, teacher_tokenizer=None):
    """The teacher's tokenizer (`teacher_ref`'s, unless loaded already) and the student's read as bytes
    (`alignment.VocabularyPair`); a teacher without a chat template refused, since its prompts are rendered with it."""
    import logging

    from .. import models
    from .alignment import VocabularyPair

    teacher_tokenizer = teacher_tokenizer or models.load_tokenizer(teacher_ref)
    if not getattr(teacher_tokenizer, "chat_template", None):
        from ..errors import ModelError

        raise ModelError(f"{teacher_ref.flag} {teacher_ref.name}: the tokenizer has no chat template, and "
                         "--cross_tokenizer renders the teacher's prompts with its own; use an instruct/chat teacher")
    pair = VocabularyPair(student_tokenizer, teacher_tokenizer, student_stop_ids,
                          models.stop_token_ids(teacher_tokenizer, teacher_ref), teacher_ref.name,
                          models.template_end_of_turn(teacher_tokenizer))
    logging.getLogger("gkd").info("--cross_tokenizer: %s (%s)", pair.describe(), teacher_ref.name)
    return pair


def open_teacher(model_args, training_args, student_tokenizer, stop_token_ids, num_samples: int,
                 data_fingerprint: str, teacher_ref=None, pair=None) -> Teacher:
    """The run's one teacher, opened from the options with its K decided: a cache checked against the encoded data,
    a server checked for what the run asks of it, or a live model (`teacher_ref` from `check_teacher`) that loads
    when the trainer starts. Before the output folder is touched, so every refusal comes first. Several teachers
    (`--teacher NAME=SOURCE`) open one by one, each as the run's one (`teacher_ref` is then `check_teacher`'s refs by
    name), behind one `RoutedTeacher`."""
    if model_args.teacher:
        from ..config import named_teacher
        from .routed import RoutedTeacher

        opened = {}
        for spec in model_args.teacher_specs:
            with named_teacher(spec.name):
                opened[spec.name] = open_teacher(model_args.for_teacher(spec), training_args, student_tokenizer,
                                                 stop_token_ids, num_samples, data_fingerprint,
                                                 (teacher_ref or {}).get(spec.name), (pair or {}).get(spec.name))
        return RoutedTeacher(opened)
    kind = model_args.teacher_kind
    if kind == "cache":
        from ..data import EncodeOptions
        from .cache import CachedTeacher, CacheIdentity, TeacherCache, check_fits, read_manifest

        options = EncodeOptions(training_args.max_length, training_args.max_new_tokens, tuple(stop_token_ids))
        identity = CacheIdentity.of(data_fingerprint, student_tokenizer, options, num_samples,
                                    pair.teacher if pair else None)
        manifest = read_manifest(model_args.teacher_logits_path)
        check_fits(manifest, identity, training_args.teacher_top_k, model_args.teacher_logits_path)
        if pair is None:
            cache = TeacherCache(model_args.teacher_logits_path, len(student_tokenizer))
            return CachedTeacher(cache, training_args.teacher_top_k, training_args.beta)
        from .cross import CrossTokenizerTeacher  # the cache holds the teacher's tokens: aligned as a run reads them

        cache = TeacherCache(model_args.teacher_logits_path, manifest["teacher_vocab_size"])
        return CrossTokenizerTeacher(CachedTeacher(cache, training_args.teacher_top_k, training_args.beta), pair,
                                     training_args.teacher_top_k or cache.top_k, training_args.beta,
                                     manifest["teacher_vocab_size"], training_args.max_length)
    if kind == "server":
        from .server import ServedTeacher, TeacherServer, check_tokenizer

        server = TeacherServer(model_args.teacher_server_url, training_args.teacher_server_timeout,
                               training_args.teacher_server_retries, training_args.teacher_server_concurrency)
        server.describe()
        check_tokenizer(server, pair.teacher if pair else student_tokenizer,
                        model_args.teacher_tokenizer_name_or_path, model_args.trust_remote_code)
        server.check(training_args.teacher_top_k or 1, training_args.max_length)
        served = ServedTeacher(server, training_args.teacher_top_k, training_args.beta)
        if pair is None:
            return served
        from .cross import CrossTokenizerTeacher

        return CrossTokenizerTeacher(served, pair, training_args.teacher_top_k, training_args.beta, len(pair.teacher),
                                     training_args.max_length)
    from .live import LiveTeacher

    live = LiveTeacher.from_options(None, training_args, ref=teacher_ref, model_args=model_args)
    if pair is None:
        return live
    from .. import models
    from .cross import CrossTokenizerTeacher

    vocab_size = min(len(pair.teacher), models.embedding_size(teacher_ref))
    return CrossTokenizerTeacher(live, pair, training_args.teacher_top_k, training_args.beta, vocab_size,
                                 training_args.max_length)
