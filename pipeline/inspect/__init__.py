"""`shardgen inspect`: read an output's shards through DuckDB (output.py), summarise them as text
or JSON (summary.py), or as one static HTML page (report.py, templates/)."""
