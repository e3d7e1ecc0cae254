"""`ottimo card show VERSION` and `ottimo card compare A B`: model cards of registered versions.

VERSION, A and B are version numbers or aliases (champion, challenger, previous-champion) of the registered model
named in params.yaml (or --model). `show` measures the card again from the version's ONNX file and data revision
and says whether it matches the stored one; `compare` puts two stored cards side by side.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ottimo.cli.common import PARAMS, PROJECT, cell, params_or_exit, say
from ottimo.config import Params

card_app = typer.Typer(help="Model cards of registered versions: show one, compare two.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

MODEL = typer.Option(None, "--model", "-m", help="Registered model; default: mlflow.registered_model in params.")


def _open(project_dir: Path, params_file: str, model: str | None):
    from ottimo.registry.tracking import connect

    root = project_dir.resolve()
    params = params_or_exit(root, params_file)
    client, _ = connect(root, params.mlflow)
    return root, params, client, model or params.mlflow.registered_model


def _card(root: Path, params: Params, client, name: str, ref: str, recompute: bool, work: Path):
    """The stored card of `ref`, or a fresh measurement when asked or when none is stored."""
    from ottimo.card import store as cardstore
    from ottimo.registry import versions

    if not recompute:
        stored = cardstore.load_stored(client, versions.version(client, name, ref))
        if stored is not None:
            return stored
        say(f"{name} {ref} has no stored card: measuring it now", out=err)
    return cardstore.recompute(root, params, client, name, ref, work)[0]


@card_app.command("show")
def show(
    version: str = typer.Argument(..., help="Version number or alias."),
    model: str | None = MODEL,
    stored: bool = typer.Option(False, "--stored", help="Print the stored card; measure nothing."),
    write: bool = typer.Option(False, "--write", help="Store the recomputed card (description and card/ artifacts)."),
    as_json: bool = typer.Option(False, "--json", help="Print card.json instead of markdown."),
    project_dir: Path = PROJECT,
    params_file: str = PARAMS,
) -> None:
    """Recompute a version's card from its ONNX file and data revision and print it (markdown)."""
    from ottimo.card import store as cardstore
    from ottimo.card.render import render
    from ottimo.card.sections import deterministic
    from ottimo.registry import versions

    root, params, client, name = _open(project_dir, params_file, model)
    with tempfile.TemporaryDirectory() as tmp:
        if stored:
            card = cardstore.load_stored(client, versions.version(client, name, version))
            if card is None:
                say(f"{name} {version} has no stored card; run without --stored to measure it", "red", err)
                raise typer.Exit(1)
            old = None
        else:
            card, old, mv = cardstore.recompute(root, params, client, name, version, Path(tmp))
            if write:
                cardstore.store(client, name, mv, card, Path(tmp) / cardstore.CARD_DIR)
        typer.echo(json.dumps(card.to_dict(), indent=1) if as_json else render(card))
    if old is not None:
        new, before = deterministic(card), deterministic(old)
        differ = [k for k in before if before[k] != new.get(k)]
        say("recomputed card matches the stored one on every deterministic field" if not differ else
            f"recomputed card differs from the stored one in: {', '.join(differ)}", None if not differ else "yellow",
            err)
    elif not stored:
        say("no stored card to compare with" + ("; stored this one" if write else " (--write stores it)"), out=err)


def _fmt(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.4g}"


@card_app.command("compare")
def compare(
    a: str = typer.Argument(..., help="Version number or alias, e.g. champion."),
    b: str = typer.Argument(..., help="Version number or alias, e.g. challenger."),
    model: str | None = MODEL,
    recompute: bool = typer.Option(False, "--recompute", help="Measure both now, one after the other, instead of "
                                   "reading their stored cards (timings then come from the same machine and load)."),
    project_dir: Path = PROJECT,
    params_file: str = PARAMS,
) -> None:
    """Two cards side by side, marking the better one on every figure and on each of the eight dimensions."""
    from ottimo.card.sections import SECTIONS
    from ottimo.card.sections import compare as compare_cards

    root, params, client, name = _open(project_dir, params_file, model)
    with tempfile.TemporaryDirectory() as tmp:
        ca = _card(root, params, client, name, a, recompute, Path(tmp) / "a")
        cb = _card(root, params, client, name, b, recompute, Path(tmp) / "b")
    rows, dims = compare_cards(ca, cb)
    la, lb = ca.lineage, cb.lineage
    title = (f"{name}: A = {a} (v{la.get('version')}, {la.get('family')}) vs "
             f"B = {b} (v{lb.get('version')}, {lb.get('family')})")
    table = Table(title=cell(title))
    for col in ("dimension", "figure", "A", "B", "better"):
        table.add_column(col, no_wrap=col != "dimension")
    for section, heading in SECTIONS.items():
        table.add_row(f"[bold]{heading}[/bold]", "", "", "", f"[bold]{dims[section]}[/bold]", end_section=False)
        for r in (r for r in rows if r["section"] == section):
            table.add_row("", r["figure"].split(".", 1)[1], _fmt(r["a"]), _fmt(r["b"]), r["better"])
        if section == "lineage":
            for key in ("data_revision", "code_commit", "sha256", "teacher"):
                same = la.get(key) == lb.get(key)
                table.add_row("", key, cell(str(la.get(key))[:12]), cell(str(lb.get(key))[:12]),
                              "same" if same else "differs")
            table.add_row("", "gate verdict", cell(la.get("gate", {}).get("verdict")),
                          cell(lb.get("gate", {}).get("verdict")), "")
        table.add_section()
    console.print(table)
    wins = {k: [s for s, w in dims.items() if w == k] for k in ("A", "B")}
    say(f"A better on: {', '.join(wins['A']) or 'none'}; B better on: {', '.join(wins['B']) or 'none'} "
        "(a dimension goes to the card that wins more of its figures)")
