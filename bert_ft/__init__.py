"""bert-ft: fine-tune BERT encoders for NER, relation and sentence classification.

    from bert_ft import TrainConfig, finetune, predict, load_model
    from tasks import TASKS
"""

__version__ = "0.1.0"

# The submodule bert_ft.predict shares the API function's name: import it first, so that a later
# `import bert_ft.predict` elsewhere finds it loaded and does not rebind `bert_ft.predict` to the module.
from . import predict as _predict_module  # noqa: E402,F401
from .api import finetune, predict  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .heads import Head, load_model  # noqa: E402
from .task import ClassificationTask, Evaluation, Features, Task  # noqa: E402

__all__ = ["TrainConfig", "finetune", "predict", "load_model", "Task", "ClassificationTask", "Head", "Features",
           "Evaluation", "__version__"]
