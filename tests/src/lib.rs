//! End-to-end harness for Vigil (the bridge, the simulator and a real cloud
//! broker together). The store's own tests live in `bridge/tests/`; the
//! end-to-end tests arrive with the gate and forwarder (issues 3 and 4).
