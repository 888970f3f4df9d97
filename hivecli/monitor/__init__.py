"""`hive monitor`: a live web dashboard of a run, read from what its peers publish in the DHT.

history.py   what the monitor remembers of each run (pure data, every field checked)
collector.py the thread that reads the runs' records from the DHT
server.py    the web server (aiohttp) and the page in static/ (charts: uPlot, vendored)
"""
