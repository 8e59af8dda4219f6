//! The sans-IO sync state machine on a tablet's side: a session of length-prefixed frames
//! from a server, reconnecting after a close, no panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    relais_core::protocol::fuzzing::outbound_session(data);
});
