"""The fleet's class order on the server: where it comes from (the bundle's names, the server's
own ``--data``, a resumed run's record, else the first client's; runtime/fleet/server.py), and
the server's own data numbered by it."""

from __future__ import annotations

from .local import Local, UserError, class_names

__all__ = ["agree_here", "fleet_classes", "numbered_classes", "resumed_classes"]


def agree_here(local: Local, classes: list[str], say) -> None:
    """Number the server's own ``--data`` as the fleet's ``classes`` (session 27 probe: the
    built-in digits, "0".."9", scored a fleet named "9".."0" by its first client at 0.008
    where `eval` with the same weights said 0.908)."""
    try:
        line = local.agree_classes(classes)
    except UserError as exc:
        say(f"note: the server's --data cannot be numbered as the fleet's classes ({exc}); its "
            "held-out figures use its own numbering")
        return
    if line:
        say("the server's --data: " + line.replace("this device's labels", "its labels"))


def resumed_classes(local: Local, earlier: dict) -> list[str] | None:
    """The class order of the aggregate a resumed run goes on from (None: none recorded).

    Raises:
        UserError: the bundle names its classes in another order (its outputs would be read
            as other classes than the aggregate was trained for).
    """
    from ..data import ids_only

    names = class_names(earlier.get("class_names"))
    own = local.bundle.manifest.class_names
    if names and not ids_only(own) and list(own) != names:
        raise UserError(f"--resume: the aggregate was trained with the classes numbered "
                        f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''}; this "
                        f"bundle numbers them {', '.join(list(own)[:6])}"
                        f"{', ...' if len(own) > 6 else ''}; resume with the bundle the run "
                        "started with, or start afresh with --overwrite")
    return names


def fleet_classes(local: Local) -> list[str] | None:
    """The fleet's label map where the server knows one: the bundle's class names (``export
    --classes``), else those of the server's own ``--data`` (both relabelled to it)."""
    from ..data import ids_only

    names = local.bundle.manifest.class_names
    data = getattr(local.data, "class_names", None)
    for c in (names, data):
        if not ids_only(c):
            return list(c)
    return None


def numbered_classes(local: Local, trained: bool) -> list[str] | None:
    """Where the fleet has no class names and its weights were ``trained`` already (on numbered
    labels): those numbers as its names, "0", "1", ..., so that a client naming its classes is
    numbered by them; None otherwise (its first client's names may number the fleet)."""
    loss = local.bundle.loss
    if not trained or loss.kind != "cross_entropy" or not loss.num_classes:
        return None
    return [str(i) for i in range(loss.num_classes)]
