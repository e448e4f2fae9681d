"""The ``Doc`` extensions the pipeline writes, registered in one place so a component, the
spacy-llm task and a loaded DocBin agree on their names. Values are plain (dicts of lists of
numbers and strings) so docs serialise.

- ``doc._.llm_mentions``: ``{generator name: [stored mention, ...]}`` (``types.stored_mentions``)
- ``doc._.llm_search_text``: ``{generator name: text}`` where a generator normalised its input,
  the text its mentions are searched in
- ``doc._.llm_io``: ``{generator name: [prompt/response record, ...]}`` when ``save_io`` is on
"""
from spacy.tokens import Doc

LLM_MENTIONS = "llm_mentions"
LLM_SEARCH_TEXT = "llm_search_text"
LLM_IO = "llm_io"

for _name in (LLM_MENTIONS, LLM_SEARCH_TEXT, LLM_IO):
    if not Doc.has_extension(_name):
        Doc.set_extension(_name, default=None)


def per_generator(doc: Doc, extension: str) -> dict:
    """The doc's ``{generator name: value}`` mapping under ``extension``, created when absent,
    so several generators in one pipeline each add their own entry."""
    value = getattr(doc._, extension)
    if value is None:
        value = {}
        setattr(doc._, extension, value)
    return value
