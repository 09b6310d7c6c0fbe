//! `ember` command-line interface.
fn main() {
    println!("ember {}", ember::VERSION);
}
