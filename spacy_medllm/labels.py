"""Label schemes: the entity types a prompt asks for, with display names and definitions.

A prompt names types by their display name (``疾病``) and explains them with a short
definition; spans and mentions carry the scheme's code (``dis``), the label the corpus
readers write. A scheme is either builtin (``cmeee``, ``ccks2019``, ``rocling``, ``ncbi``,
``bc5cdr``, ``bc2gm``), a mapping given in a config, or a JSON file::

    {"name": "mine", "language": "zh",
     "labels": {"dis": {"name": "疾病", "definition": "…"}, "sym": "临床表现"}}
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

import srsly
from spacy.util import registry

LANGUAGES = ("zh", "en")


@dataclass(frozen=True)
class LabelInfo:
    code: str
    name: str
    definition: str = ""


@dataclass(frozen=True)
class LabelScheme:
    """An ordered set of entity types; ``labels`` maps code → :class:`LabelInfo`."""

    name: str
    language: str
    labels: Dict[str, LabelInfo]
    _lookup: Dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.language not in LANGUAGES:
            raise ValueError(f"Label scheme {self.name!r}: language must be one of {LANGUAGES}, not {self.language!r}")
        if not self.labels:
            raise ValueError(f"Label scheme {self.name!r} has no labels")
        lookup: Dict[str, str] = {}
        # display names win over codes, exact spellings over case-folded ones
        for key_of in (lambda i: i.name, lambda i: i.code, lambda i: i.name.casefold(), lambda i: i.code.casefold()):
            for info in self.labels.values():
                lookup.setdefault(key_of(info), info.code)
        names = [i.name for i in self.labels.values()]
        if len(set(names)) != len(names):
            raise ValueError(f"Label scheme {self.name!r}: display names must be unique, got {names}")
        object.__setattr__(self, "_lookup", lookup)

    def __iter__(self) -> Iterator[LabelInfo]:
        return iter(self.labels.values())

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, code: object) -> bool:
        return code in self.labels

    @property
    def codes(self) -> List[str]:
        return list(self.labels)

    def display(self, code: str) -> str:
        """The name a prompt or a response uses for ``code``."""
        return self.labels[code].name

    def code_of(self, name: str) -> Optional[str]:
        """The code for a display name or a code as an LLM wrote it (case-insensitive,
        surrounding whitespace ignored), or None for an unknown type."""
        name = name.strip()
        return self._lookup.get(name) or self._lookup.get(name.casefold())

    def spellings(self) -> List[str]:
        """Every accepted spelling of every type, longest first (for prefix matching)."""
        return sorted(set(self._lookup), key=lambda s: (-len(s), s))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: Optional[str] = None, language: Optional[str] = None) -> "LabelScheme":
        """Build from ``{"name", "language", "labels"}`` or from a bare ``labels`` mapping
        whose values are a display name or ``{"name", "definition"}``."""
        labels_data = data["labels"] if "labels" in data and isinstance(data["labels"], Mapping) else data
        labels: Dict[str, LabelInfo] = {}
        for code, value in labels_data.items():
            if isinstance(value, str):
                labels[code] = LabelInfo(code, value)
            elif isinstance(value, Mapping):
                labels[code] = LabelInfo(code, str(value.get("name", code)), str(value.get("definition", "")))
            else:
                raise ValueError(f"Label {code!r}: expected a display name or {{name, definition}}, got {value!r}")
        scheme_name = name or (data.get("name") if labels_data is not data else None) or "custom"
        lang = language or (data.get("language") if labels_data is not data else None) or "zh"
        return cls(str(scheme_name), str(lang), labels)

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "LabelScheme":
        path = Path(path)
        if not path.exists():
            raise ValueError(f"Label scheme file not found: {path}")
        return cls.from_dict(srsly.read_json(path), name=None)


def _scheme(name: str, language: str, rows: List[tuple]) -> LabelScheme:
    return LabelScheme(name, language, {code: LabelInfo(code, disp, definition) for code, disp, definition in rows})


BUILTIN_SCHEMES: Dict[str, LabelScheme] = {
    "cmeee": _scheme("cmeee", "zh", [
        ("dis", "疾病", "导致身体处于不健康状态的疾病、综合征、中毒、损伤及器官或细胞的病变"),
        ("sym", "临床表现", "疾病的症状、体征和异常的检查结果"),
        ("pro", "医疗程序", "为诊断、治疗或预防疾病而实施的检查、手术、治疗等操作"),
        ("equ", "医疗设备", "诊疗中使用的仪器、设备、器械和材料"),
        ("dru", "药物", "用于预防、诊断或治疗疾病的药品和化学物质"),
        ("ite", "医学检验项目", "为诊断而检测的指标和检验项目"),
        ("bod", "身体", "人体的器官、组织、部位、细胞和体液"),
        ("dep", "科室", "医院的科室和部门"),
        ("mic", "微生物类", "细菌、病毒、真菌、寄生虫等微生物"),
    ]),
    "ccks2019": _scheme("ccks2019", "zh", [
        ("疾病和诊断", "疾病和诊断", "医学上定义的疾病，以及医生对病因、病理、分型分期等作出的诊断"),
        ("影像检查", "影像检查", "X线、CT、磁共振、PET-CT、造影、超声、心电图等影像学检查"),
        ("实验室检验", "实验室检验", "在实验室进行的物理或化学检验"),
        ("手术", "手术", "医生在患者身体局部实施的切除、缝合等外科治疗"),
        ("药物", "药物", "用于治疗疾病的具体化学物质"),
        ("解剖部位", "解剖部位", "疾病、症状和体征发生的人体解剖学部位"),
    ]),
    "rocling": _scheme("rocling", "zh", [
        ("BODY", "身体部位", "人体的器官、组织和部位"),
        ("SYMP", "症状", "身体不适的症状或体征"),
        ("INST", "医疗器材", "医疗用的仪器和器材"),
        ("EXAM", "医学检验", "检查或检验的项目"),
        ("CHEM", "化学物质", "化学物质或成分"),
        ("DISE", "疾病", "疾病或病症"),
        ("DRUG", "药品", "用于治疗的药品"),
        ("SUPP", "保健食品", "营养补充品和保健食品"),
        ("TREAT", "治疗", "治疗方式、疗法或手术"),
        ("TIME", "时间", "与健康或病程有关的时间或期间"),
    ]),
    "ncbi": _scheme("ncbi", "en", [
        ("Disease", "disease", "a disease, disorder, syndrome or other abnormal condition, including its specific class"),
    ]),
    "bc5cdr": _scheme("bc5cdr", "en", [
        ("Chemical", "chemical", "a chemical compound or drug, by name, brand name or abbreviation"),
        ("Disease", "disease", "a disease, disorder, syndrome or adverse effect"),
    ]),
    "bc2gm": _scheme("bc2gm", "en", [
        ("GENE", "gene", "a gene or gene product such as a protein, RNA or protein family"),
    ]),
}


def get_scheme(scheme: Union[str, Path, Mapping[str, Any], LabelScheme], language: Optional[str] = None) -> LabelScheme:
    """A scheme from a builtin name (case-insensitive), a ``.json`` path, a mapping, or itself."""
    if isinstance(scheme, LabelScheme):
        return scheme
    if isinstance(scheme, Mapping):
        return LabelScheme.from_dict(scheme, language=language)
    key = str(scheme).strip().lower()
    if key in BUILTIN_SCHEMES:
        return BUILTIN_SCHEMES[key]
    if str(scheme).endswith(".json") or Path(str(scheme)).exists():
        return LabelScheme.from_json(scheme)
    raise ValueError(f"Unknown label scheme {scheme!r}: use one of {sorted(BUILTIN_SCHEMES)}, a .json file or a mapping")


@registry.misc("spacy_medllm.LabelScheme.v1")
def make_label_scheme(
    scheme: Union[str, Dict[str, Any]] = "cmeee",
    language: Optional[str] = None,
) -> LabelScheme:
    """``scheme``: a builtin name, a path to a JSON file, or a mapping code → display name
    or ``{name, definition}``; ``language`` (``zh``/``en``) for a mapping."""
    return get_scheme(scheme, language=language)
