//! The five-minute tour of the SDK against a running `shoal dev` cluster.
//! Usage: `cargo run -p shoal-client --example tour -- [DEV_DIR]`.

use shoal_client::{Client, ClientConfig};

#[tokio::main]
async fn main() -> Result<(), shoal_client::Error> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| ".shoal-dev".into());
    let client = Client::connect(ClientConfig::from_dir(std::path::Path::new(&dir))?).await?;

    client.put(b"greeting", b"hello", None).await?;
    let read = client.get(b"greeting").await?;
    println!("greeting = {:?}", read.values);

    // Two puts without a context are concurrent: both survive as siblings.
    client.put(b"cart", b"apple", None).await?;
    client.put(b"cart", b"pear", None).await?;
    println!("cart siblings = {:?}", client.get(b"cart").await?.values);

    // Resolve them and write back with the context that covers both.
    client
        .read_modify_write(b"cart", 5, |siblings| {
            let mut items: Vec<&[u8]> = siblings.iter().map(|v| &v.0[..]).collect();
            items.sort();
            items.dedup();
            items.join(&b","[..])
        })
        .await?;
    println!("cart = {:?}", client.get(b"cart").await?.values);
    Ok(())
}
