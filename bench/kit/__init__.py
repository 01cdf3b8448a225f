"""The benchmark kit: what every scenario shares, and nothing scenario-specific.

- `server`: the real server as a subprocess (benchmarks and tests alike), its flags, `serving` for a block;
- `scrape`: what /metrics and /proc say (sums over labels, batch work between scrapes, serving versions, RSS);
- `data`: query/title pairs and the serialized requests built from them;
- `engine`: the raw ONNX Runtime engine, the limit every server number is a ratio of;
- `rates`: the one rate search (`search`: open-loop steps judged by `loadtest.sweep.judge`, grid then bisection;
  `outcome`, `sweep`) and the sustainable rate;
- `timeline`: load over time, every call's outcome, the server sampled as it goes, the timeline plot;
- `swap`: throw-away repositories and hot swaps followed through the server's JSON log;
- `sustained`: the run overload, swaps and soak share (server on a throw-away repository, sustainable rate,
  load with sampling and hot swaps, publish) and their targets and section helpers;
- `run`: what a scenario holding its own servers to the raw engine shares (cache_zipf, workers_scale): common
  flags, the model's inputs, the raw engine limit, servers stopped at exit (SIGTERM too), header to `publish`;
- `machine`: the machine, how runs are arranged on its cores, and who used its CPUs and memory;
- `publish`: results.json, a tool's BENCHMARKS.md section and plots;
- `cli`, `fmt`: the shared command line, progress lines and number formatting.

A kit module never imports a scenario (`bench/<name>.py`) or a report (`bench/reports/`).
"""
