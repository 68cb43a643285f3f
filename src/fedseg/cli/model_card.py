"""``fedseg model-card``: print the manifest of an exported model.

Exit codes: 0 success; 2 bad input (no card beside the model, a malformed card, weights that do
not match the card's sha256); 3 an internal failure.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedseg.cli._common import user_errors


def register(app: typer.Typer) -> None:
    """Add the ``model-card`` command to ``app``."""

    @app.command("model-card")
    def model_card(
        model: Path = typer.Argument(
            ..., help="Exported model (best.pt, final_model.pt, models/<arm>.pt) or run folder."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the card as JSON."),
    ) -> None:
        """Print what a model is and how it was trained: fedseg version, config and preset,
        strategy, hospitals and case counts, rounds, epsilon per site (DP), Dice table, sha256
        of the weights (checked against the file).

        Exit codes: 0 success, 2 no or bad card, 3 internal failure."""
        import json

        from fedseg.clinic.card import format_card, read_card, resolve_model

        with user_errors():
            card = read_card(resolve_model(model))
        if json_out:
            print(json.dumps(card, indent=2))
            return
        typer.echo(format_card(card))
