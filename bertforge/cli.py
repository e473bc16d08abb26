"""The `bertforge` command: `bertforge bench ...` runs the benchmarks (bertforge.bench.command); every other
command (pretrain, finetune, convert) is bertforge.train.cli's."""

import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from bertforge.bench.command import main as bench

        return bench(argv[1:])
    from bertforge.train.cli import main as train

    return train(argv)


if __name__ == "__main__":
    sys.exit(main())
