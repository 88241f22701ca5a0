"""bert-ft: fine-tune BERT encoders for NER, relation and sentence classification."""

__version__ = "0.1.0"
