"""mm.models"""
