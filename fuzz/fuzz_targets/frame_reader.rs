//! The control-stream frame reader, as a session runs it: arbitrary bytes
//! from a follower are read as length-delimited `ClientFrame`s (at most the
//! default control frame size) and each is converted into the domain
//! request, until the stream ends or a frame is refused. Nothing may panic,
//! and a declared length over the bound must be refused before allocating.

#![no_main]

use herald_proto::model::ClientRequest;
use herald_proto::v1 as pb;
use herald_proto::FrameReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut reader = FrameReader::new(data, herald_proto::frame::DEFAULT_MAX_CONTROL_FRAME)
            .with_idle_capacity(256);
        while let Ok(Some(frame)) = reader.read_frame::<pb::ClientFrame>().await {
            let _ = <(u64, ClientRequest)>::try_from(frame);
        }
    });
});
