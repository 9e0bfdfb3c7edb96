//! Every protobuf message the server decodes from the network (the
//! follower's `ClientFrame`, converted into the domain request it stands
//! for, as the session does), plus the two the client library decodes from
//! the server (`ServerFrame`, `FeedFrame`). The first byte picks the
//! message; nothing may panic.

#![no_main]

use herald_proto::model::ClientRequest;
use herald_proto::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(f) = pb::ClientFrame::decode(bytes) {
                let _ = <(u64, ClientRequest)>::try_from(f);
            }
        }
        1 => {
            let _ = pb::ServerFrame::decode(bytes);
        }
        _ => {
            let _ = pb::FeedFrame::decode(bytes);
        }
    }
});
