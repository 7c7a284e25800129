"""The contract every refused CLI call keeps: exit code 2, one line on stderr naming
what is wrong, no traceback, and nothing written."""

from mode_jax.cli import main


def assert_refused(capsys, argv, out, *needles) -> str:
    """Run `mode-jax argv`; assert it was refused as above, that the line contains every
    needle and that `out` was not created. Returns the line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    return lines[0]
