"""mwjax/adapters"""
