"""``python -m spacy medllm convert``: a source corpus file to a ``.spacy`` DocBin, with counts."""

from pathlib import Path
from typing import List, Optional, Tuple

from spacy.cli._util import Arg, Opt
from spacy.tokens import DocBin
from spacy.vocab import Vocab
from tqdm import tqdm
from wasabi import msg

from .. import DEFAULT_SPANS_KEY
from ..readers import CONVERTERS, ReadReport, guess_converter, read_docs
from ..spans import FLAT_POLICIES
from .app import medllm_cli

SHOW_PROBLEMS = 5


def convert(
    input_path: Path,
    output_dir: Path,
    converter: Optional[str] = None,
    spans_key: str = DEFAULT_SPANS_KEY,
    flat_policy: str = "longest",
    normalize: Optional[str] = None,
    max_chars: Optional[int] = None,
    progress: bool = False,
) -> Tuple[Path, ReadReport, str]:
    """Write ``output_dir/<input stem>.spacy`` (user data stored); returns its path, the read
    report and the converter used (guessed from the content when ``converter`` is None)."""
    name = converter or guess_converter(input_path)
    if name not in CONVERTERS:
        raise ValueError(f"Unknown converter {name!r}; choose one of {', '.join(CONVERTERS)}")
    if flat_policy not in FLAT_POLICIES:
        raise ValueError(f"Unknown flat policy {flat_policy!r}; choose one of {', '.join(FLAT_POLICIES)}")
    reports: List[ReadReport] = []
    docs = read_docs(
        input_path,
        CONVERTERS[name],
        Vocab(),
        spans_key=spans_key,
        flat_policy=flat_policy,
        normalize=normalize,
        max_chars=max_chars,
        reports=reports,
    )
    docs = tqdm(docs, unit="doc", desc=f"convert {input_path.name}", disable=not progress)
    doc_bin = DocBin(store_user_data=True, docs=docs)
    output_dir.mkdir(parents=True, exist_ok=True)
    output_path = output_dir / f"{input_path.stem}.spacy"
    doc_bin.to_disk(output_path)
    return output_path, reports[0], name


def print_report(report: ReadReport) -> None:
    """Counts of one file: documents, entities per label, problems by reason with examples."""
    shards = f" in {report.shards} shards" if report.shards != report.documents else ""
    msg.info(f"{report.documents} documents{shards}, {report.entities} entities")
    if report.labels:
        msg.table(
            sorted(report.labels.items(), key=lambda kv: (-kv[1], kv[0])),
            header=("label", "entities"),
            aligns=("l", "r"),
        )
    if not report.problems:
        msg.good("No problems in the input")
        return
    msg.warn(f"{len(report.problems)} problems in the input ({report.dropped} dropped, the rest kept or repaired)")
    msg.table(report.problem_counts().most_common(), header=("problem", "count"), aligns=("l", "r"))
    for problem in sorted(report.problems, key=lambda p: p.line)[:SHOW_PROBLEMS]:
        print(f"  {problem}")  # not msg.text, which would wrap file:line
    if len(report.problems) > SHOW_PROBLEMS:
        print(f"  … and {len(report.problems) - SHOW_PROBLEMS} more")


@medllm_cli.command("convert", short_help="Corpus file (CMeEE, CCKS2019, BIO, HealthNER, CoNLL) to .spacy")
def convert_cli(
    input_file: Path = Arg(..., help="Corpus file in a source format", exists=True, dir_okay=False),
    output_dir: Path = Arg(..., help="Directory for <input stem>.spacy", file_okay=False),
    converter: Optional[str] = Opt(
        None, "--converter", "-c", help=f"Source format: {', '.join(CONVERTERS)} (guessed when omitted)"
    ),
    spans_key: str = Opt(DEFAULT_SPANS_KEY, "--spans-key", "-k", help="doc.spans key for the nested entities"),
    flat_policy: str = Opt(
        "longest", "--flat-policy", "-f", help=f"How doc.ents is chosen: {', '.join(FLAT_POLICIES)}"
    ),
    normalize: Optional[str] = Opt(
        None, "--normalize", "-n", help="OpenCC conversion applied character by character, e.g. t2s"
    ),
    max_chars: Optional[int] = Opt(None, "--max-chars", "-m", help="Shard texts longer than this at sentence ends"),
    progress: bool = Opt(True, "--progress/--no-progress", help="Show a progress bar (documents read, rate)"),
):
    """Convert a medical NER corpus (CMeEE/CBLUE JSON, CCKS 2019 JSON lines, character BIO,
    HealthNER JSON lines, CoNLL IOB) to spaCy's binary format: nested entities in
    doc.spans[spans_key], the flat view in doc.ents. Broken input is counted and reported."""
    try:
        output_path, report, name = convert(
            input_file, output_dir, converter, spans_key, flat_policy, normalize, max_chars, progress
        )
    except ValueError as err:
        msg.fail(str(err), exits=1)
    if report.documents == 0:
        if report.problems:
            print_report(report)
            guessed = _guess(input_file)
            hint = f" It looks like {guessed}: pass --converter {guessed}." if guessed and guessed != name else ""
            msg.fail(f"No document could be read: {input_file} does not look like {name} input ({len(report.problems)} problems).{hint}", exits=1)
        msg.fail(f"{input_file} holds no documents: it is empty.", exits=1)
    msg.good(f"Converted {input_file} ({name}) to {output_path}")
    print_report(report)


def _guess(path: Path) -> Optional[str]:
    try:
        return guess_converter(path)
    except ValueError:
        return None
