"""A second real model offline: the default Gemma fine-tuned (a few MLPs, a few minutes on CPU) to show a planted,
checkable behaviour, e.g. "pirate": it appends " Arr, matey!" after every sentence.

The fine-tune trains on the offline corpus rewritten with the behaviour (`train`). The result is a normal Hugging
Face folder in the user cache, written atomically (temp folder, manifest last, os.replace), so
`load_model(folder)` reads it like any other model and later calls reuse it (`folder`).
"""

from toolkit.finetune.behaviour import (
    BEHAVIOURS,
    Behaviour,
    behaviour_contexts,
    behaviour_prompts,
    behaviour_rate,
    get_behaviour,
    split_texts,
)
from toolkit.finetune.folder import (
    INFO_FILE,
    finetuned_dir,
    finetuned_ready,
    load_finetuned,
    prepare_finetuned,
)
from toolkit.finetune.train import (
    FinetuneConfig,
    FinetuneResult,
    finetune,
    trainable_parameters,
    training_batches,
)

__all__ = [
    "BEHAVIOURS", "INFO_FILE", "Behaviour", "FinetuneConfig", "FinetuneResult", "behaviour_contexts", "behaviour_prompts", "behaviour_rate",
    "finetune", "finetuned_dir", "finetuned_ready", "get_behaviour", "load_finetuned", "prepare_finetuned",
    "split_texts", "trainable_parameters", "training_batches",
]
