"""Training data: read every accepted format and source, validate each record, normalise them to one shape, and
encode them for the student, cached on disk.

    sources.py   where records come from (files, folders, save_to_disk, the Hub) and their fingerprints
    records.py   the record formats (chat, LLM-Dojo, prompt/completion, Alpaca, ShareGPT, plain text) -> Conversation
    encoding.py  chat template or plain-text windows -> prompt and completion token ids
    pipeline.py  the encoded `datasets.Dataset` a run trains on, cached by data, tokenizer and options
"""

from .encoding import EncodeOptions, EncodeStats, encode_conversations
from .pipeline import prepare_dataset, training_datasets
from .records import Conversation
from .sources import DataSource, load_conversations, read_conversations

__all__ = ["Conversation", "DataSource", "EncodeOptions", "EncodeStats", "encode_conversations", "load_conversations",
           "prepare_dataset", "read_conversations", "training_datasets"]
