"""Our recognition plugged into other frameworks' pipelines (spacy-llm)."""
