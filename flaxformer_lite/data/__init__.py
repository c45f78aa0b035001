"""The data layer: text on disk or in the TFDS catalog -> token ids -> batches on devices.

    ds = load_dataset("/path/to/input.txt")                 # or "lm1b", "synthetic/reverse"
    tok = ds.tokenizer("char")                              # cached beside the prepared data
    pipe = lm_pipeline(ds, tok, batch_size=32, max_len=256)  # packed rows, seeded, resumable
    it = iter(pipe); batch = next(it); state = it.get_state()

See docs/data.md for the builders, the catalog, caching and throughput.
"""

from flaxformer_lite.data.builders import (
    SYNTHETIC_TASKS,
    UNITS,
    Dataset,
    ExampleSource,
    ParallelCorpus,
    SyntheticTasks,
    TextCorpus,
    default_data_dir,
    find_parallel_files,
    in_memory_dataset,
    load_parallel_corpus,
    load_synthetic_task,
    load_text_corpus,
    read_text_file,
    split_units,
    synthetic_example,
    synthetic_task_splits,
)
from flaxformer_lite.data.catalog import CATALOG, CATALOG_NAMES, load_catalog, load_dataset
from flaxformer_lite.data.labelled import load_tfds_labelled, read_labelled_file
from flaxformer_lite.data.pipeline import (
    Pipeline,
    PipelineStats,
    cap_predictions,
    classification_pipeline,
    encode_masked,
    encode_sources,
    encode_texts,
    lm_pipeline,
    mask_tokens,
    mlm_pipeline,
    prefetch_to_device,
    process_shard,
    split_for_devices,
    to_global_array,
    translation_pipeline,
    window_pipeline,
)
from flaxformer_lite.data.tokenizers import (
    BOS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    UNK_ID,
    ByteTokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "BOS_ID", "CATALOG", "CATALOG_NAMES", "EOS_ID", "MASK_ID", "PAD_ID", "SYNTHETIC_TASKS",
    "UNITS", "UNK_ID", "build_tokenizer", "ByteTokenizer", "cap_predictions", "CharTokenizer",
    "classification_pipeline", "Dataset", "default_data_dir", "encode_masked", "encode_sources",
    "encode_texts", "ExampleSource", "find_parallel_files", "GPT2Tokenizer", "in_memory_dataset",
    "lm_pipeline",
    "load_catalog", "load_dataset", "load_parallel_corpus", "load_synthetic_task",
    "load_text_corpus", "load_tfds_labelled", "load_tokenizer", "mask_tokens", "mlm_pipeline",
    "ParallelCorpus", "Pipeline", "PipelineStats", "prefetch_to_device", "process_shard",
    "read_labelled_file", "read_text_file", "SentencePieceTokenizer", "split_for_devices",
    "split_units", "synthetic_example", "synthetic_task_splits", "SyntheticTasks", "TextCorpus",
    "to_global_array", "Tokenizer", "train_sentencepiece", "translation_pipeline",
    "window_pipeline",
]
