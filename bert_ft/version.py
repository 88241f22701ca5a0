"""The package version, in a module of its own: model folders record it (`bert_ft.model_folder.save_model`), and
a module inside the package can import it without importing the package's public API first."""

__version__ = "0.1.0"
