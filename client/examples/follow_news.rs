//! The README's example: an app that follows `news` and prints each post.
//! Run a server (`cargo run --release -- serve`), create the channel, then
//! `HERALD_TOKEN=$(cargo run -q -- token --user alice) cargo run -p herald-client --example follow_news`.

use herald_client::{Client, ClientOptions, ClientTrust, Event};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let trust = ClientTrust::pinned_file("herald-data/tls/cert.pem".as_ref())?;
    let token = std::env::var("HERALD_TOKEN")?; // from `herald token --user alice`
    let opts = ClientOptions::new("127.0.0.1:4433".parse()?, trust, token);
    let mut client = Client::connect(opts).await?;
    client.follow("news").await?;
    while let Some(event) = client.next_event().await {
        if let Event::Post(p) = event {
            println!("[{}#{}] {}", p.channel, p.seq, p.text);
        }
    }
    Ok(())
}
