"""The study's plots and its one self-contained HTML report."""
