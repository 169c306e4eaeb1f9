//! Black-box tests of the API: a real server on a real socket, a fresh Postgres database per
//! test (`tuna_db::testing::TestDb`), requests with reqwest.

mod artifacts;
mod errors;
mod events;
mod files;
mod helpers;
mod jobs;
mod memory;
mod openapi;
