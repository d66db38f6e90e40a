"""recbole-dealrec: DEALRec data pruning for LLM-based recommenders, as a RecBole plugin.

RecBole 1.2.1 itself is installed with ``--no-deps`` (see README): its metadata requires ray <= 2.6.3,
which has no Python 3.12 wheels and which the plugin never imports. Its real dependencies are listed here.
"""
from setuptools import find_packages, setup

RECBOLE_RUNTIME_DEPS = [
    "colorlog==4.7.2",
    "colorama==0.4.4",
    "tqdm>=4.48.2",
    "scikit-learn>=0.23.2",
    "tensorboard>=2.5.0",
    "thop>=0.1.1.post2207130030",
    "tabulate>=0.8.10",
    "plotly>=4.0.0",
    "texttable>=0.9.0",
    "psutil>=5.9.0",
]

setup(
    name="recbole-dealrec",
    version="0.1.0",
    description="DEALRec data pruning for LLM-based recommenders, as a RecBole plugin",
    python_requires=">=3.10",
    packages=find_packages(include=["recbole_dealrec", "recbole_dealrec.*"]) + ["recbole_dealrec.properties"],
    # The layered property files live at the top level of the repository and install inside the package.
    package_dir={"recbole_dealrec.properties": "properties"},
    package_data={"recbole_dealrec.properties": ["*.yaml", "*/*.yaml"]},
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "pandas>=2.0",
        "pyyaml>=6.0",
        "transformers>=4.45",
        "peft>=0.12",
        "gguf>=0.10",
        "matplotlib>=3.7",
        *RECBOLE_RUNTIME_DEPS,
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": ["run_recbole=recbole_dealrec.quick_start:main"]},
)
