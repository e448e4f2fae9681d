__title__ = "spacy-medllm"
__version__ = "0.1.0"
