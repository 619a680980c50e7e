"""The application: what a user runs on top of the library (never imported by it).

`tasks` (the registry of every task fact), `request` (the typed, validated request), `run` (one run, one GPU or
torchrun), `distributed` (whole runs across ranks), `output` (output files), `convert` (the repository converter),
`tiny` (toy components for `--model tiny`), `cli` (`skyreels-v3`), `web` (the Gradio app).
"""
