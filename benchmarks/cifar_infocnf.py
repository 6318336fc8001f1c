"""Train CNF / CCNF / InfoCNF with fixed, scheduled or learned tolerances (the paper's Sections 4.1-4.5).

    python benchmarks/cifar_infocnf.py --preset cpu --compare --out runs/compare      # digits, minutes
    python benchmarks/cifar_infocnf.py --dataset cifar10 --data-dir DATA --preset paper-small \\
        --model infocnf --tolerance learned --device cuda --out runs/cifar-infocnf-learned
    torchrun --nproc_per_node=4 benchmarks/cifar_infocnf.py --preset paper-large ...

See ``--help`` for every flag and docs/flows.md for what each run writes.
"""

from tolgate_flows.cli import main

if __name__ == "__main__":
    main()
