"""fastopt's airspeed velocity suite; see asv_bench/asv.conf.json and README.md."""
