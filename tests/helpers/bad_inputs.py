"""The bad-input corpus: every malformed data file and config the tests feed Ottimo, with the message expected.

Each data case writes its bad file from a good frame, so any path that reads data (the training pipeline's
`validate_raw`, the scoring flow's incoming batches) can replay the same cases. README's "Bad input" table is
generated from this module: `python -m tests.helpers.bad_inputs --readme` rewrites it, `--markdown` prints it.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BEGIN, END = "<!-- bad-inputs:begin (python -m tests.helpers.bad_inputs --readme) -->", "<!-- bad-inputs:end -->"
TARGET = "target"

Writer = Callable[[Path, pd.DataFrame, Path], Path]  # (file to write, a good frame, a folder outside the project)


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the input, in words
    expect: tuple[str, ...]  # fragments the error message must contain
    write: Writer | None = None  # data cases: writes the bad file, returns the path data.path points at
    suffix: str = ".csv"
    limits: dict = field(default_factory=dict)  # `limits:` overrides for this case
    copied: bool = True  # data cases: the quarantine keeps a copy (False: outside the project or too big)
    needs_target: bool = False  # only meaningful for labelled data (not for unlabelled scoring batches)
    params: dict | None = None  # config cases: a params.yaml patch ...
    text: str | None = None  # ... or the raw text of params.yaml
    params_file: str = "params.yaml"  # ... or the params file a flow run / CLI names
    batch: tuple[str, ...] | None = ()  # as an incoming batch: fragments of its quarantine reason (() = `expect`) ...
    batch_ok: str = ""  # ... or None, and why the scoring flow scores such a batch (tests/flows/test_loop_hardening.py)

    @property
    def batch_expect(self) -> tuple[str, ...]:
        """What the quarantine note of this file as an incoming batch must say; () when it is scored instead."""
        return () if self.batch is None else (self.batch or self.expect)

    @property
    def kind(self) -> str:
        return "data" if self.write else "config"


def _csv(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Writer:
    def write(path: Path, good: pd.DataFrame, outside: Path) -> Path:
        change(good.copy()).to_csv(path, index=False)
        return path
    return write


def _set(row: int, column: str, value) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        if isinstance(value, str | float) and not pd.api.types.is_object_dtype(df[column]):
            df[column] = df[column].astype(object if isinstance(value, str) else float)
        df.loc[row, column] = value
        return df
    return change


def _empty(path: Path, good: pd.DataFrame, outside: Path) -> Path:
    path.write_bytes(b"")
    return path


def _truncated_parquet(path: Path, good: pd.DataFrame, outside: Path) -> Path:
    good.to_parquet(path, index=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy cut off half way: no footer
    return path


def _latin1(path: Path, good: pd.DataFrame, outside: Path) -> Path:
    text = good.to_csv(index=False)
    path.write_bytes(text.replace("pixel_0_1", "pixél_0_1", 1).encode("latin-1"))  # é as the single byte 0xe9
    return path


def _duplicate_header(path: Path, good: pd.DataFrame, outside: Path) -> Path:
    df = good.copy()
    first = df.columns[0]
    df.columns = [first, first, *df.columns[2:]]
    df.to_csv(path, index=False)
    return path


def _huge(path: Path, good: pd.DataFrame, outside: Path) -> Path:
    with open(path, "wb") as f:
        f.write(good.head(0).to_csv(index=False).encode())
        f.truncate(10 << 30)  # 10 GiB, sparse: takes no disk, would take minutes and all memory to read
    return path


def _many_rows(path: Path, good: pd.DataFrame, outside: Path) -> Path:
    pd.concat([good] * 3, ignore_index=True).to_parquet(path, index=False)
    return path


def _symlink_out(path: Path, good: pd.DataFrame, outside: Path) -> Path:
    real = outside / "elsewhere.csv"
    good.to_csv(real, index=False)
    path.symlink_to(real)
    return path


def _target_text(df: pd.DataFrame) -> pd.DataFrame:
    df[TARGET] = df[TARGET].astype(object)
    df.loc[6, TARGET] = "seven"
    return df


def _with_index(path: Path, good: pd.DataFrame, outside: Path) -> Path:
    good.to_csv(path)  # pandas' default: the row index as a leading column without a name
    return path


def _words_in_numbers(df: pd.DataFrame) -> pd.DataFrame:
    df["pixel_2_5"] = df["pixel_2_5"].astype(object)
    df.loc[[8, 15], "pixel_2_5"] = "unknown"
    df.loc[21, "pixel_2_5"] = "?"
    return df


CASES: list[Case] = [
    Case("nan", "a NaN cell in a feature", ("'pixel_0_3'", "not_nullable", "rows [5]"),
         _csv(_set(5, "pixel_0_3", np.nan))),
    Case("inf", "an inf cell in a feature", ("'pixel_1_1'", "finite", "rows [9]"),
         _csv(_set(9, "pixel_1_1", np.inf))),
    Case("missing-column", "a feature column left out", ("missing ['pixel_2_2']",),
         _csv(lambda df: df.drop(columns=["pixel_2_2"]))),
    Case("extra-column", "an unexpected column (e.g. a leak of the label)", ("unexpected ['leak']",),
         _csv(lambda df: df.assign(leak=1.0))),
    Case("wrong-dtype", "text in a numeric feature", ("'pixel_3_3'", "text where numbers belong", "['dark']",
                                                      "rows [4]"),
         _csv(_set(4, "pixel_3_3", "dark"))),
    Case("words-in-numbers", 'a few "unknown" and "?" cells among the numbers of a feature',
         ("'pixel_2_5'", "text where numbers belong", "['unknown', '?']", "rows [8, 15, 21]"),
         _csv(_words_in_numbers)),
    Case("index-column", "a pandas index written as a leading column (df.to_csv(path) without index=False)",
         ("first column has no name", "'Unnamed: 0'", "index=False", "data.index_column: drop"), _with_index),
    Case("empty-file", "a file of 0 bytes", ("empty (0 bytes)",), _empty),
    Case("truncated-parquet", "a Parquet file cut off half way", ("not a complete Parquet file", "truncated"),
         _truncated_parquet, suffix=".parquet"),
    Case("non-utf8-csv", "a CSV saved as Latin-1 (one byte 0xe9)", ("not UTF-8", "0xe9", "offset"), _latin1),
    Case("duplicate-columns", "two columns with the same name in the header", ("duplicate column names ['pixel_0_0']",),
         _duplicate_header),
    Case("unknown-label", "a class label outside data.labels", ("'target'", "unknown label(s) [11]", "rows [7]",
                                                                "known classes are [0, 1, 2"),
         _csv(_set(7, TARGET, 11)), needs_target=True),
    Case("missing-label", "empty target cells", ("'target'", "no label at rows [2, 30]"),
         _csv(lambda df: _set(30, TARGET, np.nan)(_set(2, TARGET, np.nan)(df))), needs_target=True),
    Case("zero-rows", "a header and no rows", ("no data rows", "only a header"), _csv(lambda df: df.head(0))),
    Case("too-few-rows", "20 rows, below data.min_rows", ("only 20 rows", "at least 100 rows"),
         _csv(lambda df: df.head(20)), batch=None, batch_ok="scored: a batch has no minimum size"),
    Case("extreme-values", "a feature of 1e300", ("beyond ±1e+09", "limits.max_abs_value", "['pixel_3_4']",
                                                 "rows [11]"), _csv(_set(11, "pixel_3_4", 1e300))),
    Case("target-text", "one class label written as text among integers", ("mixes numbers and text", "['seven']",
                                                                           "rows [6]"),
         _csv(_target_text), needs_target=True),
    Case("target-float", "a fractional class label (a regression target)", ("class labels", "fractions [3.5]",
                                                                           "rows [3]"),
         _csv(_set(3, TARGET, 3.5)), needs_target=True),
    Case("missing-target", "the target column left out", ("target column 'target' is missing",),
         _csv(lambda df: df.drop(columns=[TARGET])), needs_target=True, batch=None,
         batch_ok="scored: labels are optional in a batch"),
    Case("file-too-large", "a 10 GiB file (sparse) with default limits", ("10,240.0 MB", "limits.max_file_mb",
                                                                          "not read"), _huge, copied=False),
    Case("too-many-rows", "5,391 rows with limits.max_rows 1000 (counted from the Parquet footer)",
         ("5,391 rows", "limits.max_rows = 1,000", "not read"), _many_rows, suffix=".parquet",
         limits={"max_rows": 1000}, batch=("5,391 rows", "limits.max_rows", "not read")),
    Case("symlink-outside", "data.path is a symlink to a file outside the project",
         ("outside the project", "not read"), _symlink_out, copied=False),
    Case("config-bad-value", "gate.min_accuracy: 1.5", ("- gate.min_accuracy:", "1.5", "less than or equal to 1"),
         params={"gate": {"min_accuracy": 1.5}}),
    Case("config-unknown-key", "a misspelt key gate.max_p95_latency", ("- gate.max_p95_latency:", "unknown key"),
         params={"gate": {"max_p95_latency": 3}}),
    Case("config-path-traversal", "data.path: ../../etc/passwd.csv", ("- data.path:", "inside the project"),
         params={"data": {"path": "../../etc/passwd.csv"}}),
    Case("config-absolute-path", "data.path: /etc/passwd.csv", ("- data.path:", "not absolute"),
         params={"data": {"path": "/etc/passwd.csv"}}),
    Case("config-params-outside", "a flow run's params_file ../../(…)/etc/hosts",
         ("/etc/hosts", "outside the project"), params_file="../" * 12 + "etc/hosts"),
    Case("config-bad-limit", "limits.max_file_mb: -1", ("- limits.max_file_mb:", "greater than 0"),
         params={"limits": {"max_file_mb": -1}}),
    Case("config-not-yaml", "params.yaml that is not YAML", ("not valid YAML",), text="train: [unclosed"),
]
DATA = [c for c in CASES if c.kind == "data"]
CONFIG = [c for c in CASES if c.kind == "config"]


def good_frame() -> pd.DataFrame:
    from ottimo.data.tables import builtin_frame

    return builtin_frame("digits", TARGET)


def data_project(tmp: Path, case: Case, good: pd.DataFrame) -> tuple[Path, Path]:
    """A project whose data.path is the case's bad file (data/raw/<id><suffix>); returns (root, file)."""
    from tests.conftest import write_project

    raw = f"data/raw/{case.id}{case.suffix}"
    root = write_project(tmp / "project", {"data": {"path": raw}, "limits": case.limits})
    (root / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (tmp / "outside").mkdir(exist_ok=True)
    return root, case.write(root / raw, good, tmp / "outside")


def config_project(tmp: Path, case: Case) -> Path:
    """A project whose params.yaml carries the case's patch or text."""
    from ottimo.config import deep_merge
    from tests.conftest import write_project

    root = write_project(tmp / "project")
    if case.params is not None:
        params = deep_merge(yaml.safe_load((root / "params.yaml").read_text()), case.params)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if case.text is not None:
        (root / "params.yaml").write_text(case.text)
    return root


def config_error(case: Case, root: Path) -> str:
    """The message `project_params` raises for a config case."""
    from ottimo.config import ConfigError, project_params

    try:
        project_params(root, case.params_file)
    except ConfigError as err:
        return str(err)
    raise AssertionError(f"config case {case.id} was accepted")


def data_error(case: Case, root: Path) -> str:
    """The message the training pipeline's validate_raw task raises for a data case (it also quarantines)."""
    from ottimo.config import project_params
    from ottimo.data.intake import DataValidationError
    from tasks.data import validate_raw

    try:
        validate_raw.fn(root, project_params(root))
    except DataValidationError as err:
        return str(err)
    raise AssertionError(f"data case {case.id} was accepted")


def _plain(msg: str, tmp: Path) -> str:
    """The message with temporary paths taken out and the quarantine note dropped, on one line."""
    msg = msg.split("\nQuarantined:")[0]
    for path, name in ((tmp / "project", ""), (tmp / "outside", "<outside>")):
        for base in (str(path.resolve()), str(path)):
            msg = msg.replace(base + "/", name + "/" if name else "").replace(base, name or "<project>")
    msg = re.sub(r"\s*\n\s*", " ", msg.strip())
    return msg if len(msg) <= 260 else msg[:257] + "…"


def markdown() -> str:
    """The corpus as a markdown table, each message as the code raises it today."""
    rows = ["| # | case | input | as training data / config | as a scoring batch | error (abridged) |",
            "| --- | --- | --- | --- | --- | --- |"]
    good = good_frame()
    for i, case in enumerate(CASES, 1):
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            if case.kind == "data":
                msg = data_error(case, data_project(tmp, case, good)[0])
                where = "refused, " + ("copied to quarantine" if case.copied else "noted in quarantine (no copy)")
                batch = "moved to quarantine" if case.batch_expect else case.batch_ok
            else:
                msg, where = config_error(case, config_project(tmp, case)), "refused before any work"
                batch = "-"
            text = _plain(msg, tmp).replace("|", "\\|")
        rows.append(f"| {i} | `{case.id}` | {case.what} | {where} | {batch} | {text} |")
    return "\n".join(rows) + "\n"


def with_table(readme: str, table: str) -> str:
    """README text with the table between the markers (appended at the end when the markers are missing)."""
    block = f"{BEGIN}\n{table}{END}"
    if BEGIN in readme and END in readme:
        head, rest = readme.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return readme.rstrip("\n") + "\n\n" + block + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readme", action="store_true", help="rewrite the table in README.md")
    parser.add_argument("--markdown", action="store_true", help="print the table")
    args = parser.parse_args(argv)
    table = markdown()
    if args.readme:
        README.write_text(with_table(README.read_text(), table))
        print(f"{README}: bad-input table of {len(CASES)} cases written")
    if args.markdown or not args.readme:
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
