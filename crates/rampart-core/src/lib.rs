//! `rampart-core` is Rampart's sans-IO domain: the types every other crate speaks (API
//! bodies, configuration schema, durations, limits) and every *policy* written as a plain
//! state machine that takes `now` as an argument: health verdicts, failover (eligibility,
//! the primary's hold, the leader's failover episode), elections with pre-vote, leases,
//! the proxy's balancing and protection, backups' retention, authorization. Nothing here
//! opens a socket, reads a clock or spawns a task, so each decision can be tested with
//! explicit time.

pub mod api;
pub mod auth;
pub mod backup;
pub mod compaction;
pub mod config;
pub mod drill;
pub mod duration;
pub mod election;
pub mod failover;
pub mod field;
pub mod health;
pub mod lease;
pub mod limits;
pub mod postgres;
pub mod proxy;
pub mod region;
pub mod service;

pub use duration::{format_duration, parse_duration};
