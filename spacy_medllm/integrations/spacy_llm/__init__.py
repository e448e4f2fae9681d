"""spacy-llm's ``llm`` component running our model (``spacy_medllm.HFCausalLM.v1``) and our
task (``spacy_medllm.NERTask.v2``), registered through the ``thinc_llm_*`` entry points."""
